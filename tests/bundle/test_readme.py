"""bundle_readme: the README is a function of the manifest as written, whatever order it was built in."""

import json

import pytest

from ane_build.bundle import readme as bundle_readme
from tests.stages.tiny_export import bundle


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return json.loads((bundle(tmp_path_factory) / "manifest.json").read_text())


def test_a_manifest_read_back_sorted_renders_the_same_readme(manifest):
    """release writes the manifest with sorted keys; verify renders the README from that."""
    two_methods = {**manifest, "methods": {"prefill": 8, "forward": 1},
                   "runner_metadata": dict(reversed(manifest["runner_metadata"].items()))}
    decode_cost = manifest["decode_cost"]["methods"]["forward"]
    two_methods["decode_cost"] = {"methods": {"prefill": decode_cost, "forward": decode_cost}, "bound": None}
    read_back = json.loads(json.dumps(two_methods, sort_keys=True))
    assert list(read_back["methods"]) != list(two_methods["methods"])
    assert bundle_readme.render(read_back) == bundle_readme.render(two_methods)


def test_the_readme_verify_checks_is_the_one_release_wrote(manifest, tmp_path_factory):
    assert (bundle(tmp_path_factory) / "README.md").read_text() == bundle_readme.render(manifest)
