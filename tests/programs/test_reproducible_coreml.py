"""reproducible_coreml on a small Core ML package converted here (seconds, no ExecuTorch lowering)."""

import json
import shutil

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from ane_build.programs import reproducible_coreml


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=np.arange(64, dtype=np.float32).reshape(8, 8) / 64)

    path = tmp_path_factory.mktemp("pkg") / "model.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18).save(str(path))
    return path


def saved_twice(package, tmp_path):
    """Two copies of ``package`` as a second save would differ: other item UUIDs in Manifest.json."""
    copies = [shutil.copytree(package, tmp_path / name / package.name) for name in ("a", "b")]
    manifest = json.loads((copies[1] / "Manifest.json").read_text())
    manifest["itemInfoEntries"] = {f"other-{key}": item for key, item in manifest["itemInfoEntries"].items()}
    manifest["rootModelIdentifier"] = f"other-{manifest['rootModelIdentifier']}"
    (copies[1] / "Manifest.json").write_text(json.dumps(manifest))
    return copies


def files(package):
    return {p.relative_to(package).as_posix(): p.read_bytes() for p in sorted(package.rglob("*")) if p.is_file()}


def test_two_saves_of_one_model_become_the_same_bytes_and_still_load(package, tmp_path):
    first, second = saved_twice(package, tmp_path)
    assert files(first) != files(second)
    for copy in (first, second):
        reproducible_coreml.normalize_package(copy)
    assert files(first) == files(second)
    spec = ct.models.MLModel(str(first), skip_model_load=True).get_spec()
    assert reproducible_coreml.CONVERSION_DATE not in spec.description.metadata.userDefined
    assert spec.description.metadata.userDefined["com.github.apple.coremltools.version"] == ct.__version__


def test_another_model_gets_other_item_names(package, tmp_path):
    first, second = saved_twice(package, tmp_path)
    weights = next((second / "Data").rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    for copy in (first, second):
        reproducible_coreml.normalize_package(copy)
    names = [set(json.loads((copy / "Manifest.json").read_text())["itemInfoEntries"]) for copy in (first, second)]
    assert names[0].isdisjoint(names[1])


def test_seeded_uuids_repeat_per_seed_and_differ_between_seeds():
    def first_two(seed):
        uuids = reproducible_coreml.SeededUuids(seed)
        return [uuids.uuid4(), uuids.uuid4()]

    a, b = first_two("key-a"), first_two("key-b")
    assert a == first_two("key-a") and a[0] != a[1] and not set(a) & set(b)
    assert all(u.version == 4 for u in a + b)
