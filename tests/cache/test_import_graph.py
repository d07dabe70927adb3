import json
import shutil
import subprocess
import sys

import pytest

from ane_build import pipeline, recipe
from ane_build.cache import import_graph
from ane_build.cache.filehash import sha256_file

REAL = import_graph.PACKAGE_ROOT


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of ane_build/ that the test may edit, standing in for the real one in every key."""
    root = tmp_path / "ane_build"
    shutil.copytree(REAL, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(import_graph, "PACKAGE_ROOT", root)
    yield root
    _clear_caches()


def _clear_caches():
    for fn in (import_graph.modules, import_graph.imports, import_graph.closure, import_graph.fingerprint,
               import_graph.libraries):
        fn.cache_clear()


def _keys(rec):
    _clear_caches()
    return {name: key for name, (key, _) in pipeline.plan(rec, sha256_file).items()}


@pytest.fixture
def tiny_recipe(write):
    write("ckpt.gguf", "GGUF-bytes")
    return recipe.load(write("tiny.yaml", "source: {path: ckpt.gguf}\n"))


def test_an_edit_to_any_module_changes_the_key_of_every_stage_that_can_run_it(package_copy, tiny_recipe):
    before = _keys(tiny_recipe)
    stages = pipeline.stages_of(tiny_recipe)
    closures = {stage.name: set(import_graph.closure(stage.module_name, package_copy)) for stage in stages}
    downstream = {stage.name: {stage.name} | {s.name for s in stages if _reads(s, stage.name)} for stage in stages}
    outside = []
    for module, path in import_graph.modules(package_copy).items():
        text = path.read_text()
        path.write_text(text + "\n# an edit\n")
        changed = {name for name, key in _keys(tiny_recipe).items() if key != before[name]}
        path.write_text(text)
        running = {name for name, closure in closures.items() if module in closure}
        # A stage's key chains its upstream keys, so an edit reaches every stage after one that runs it.
        assert changed == set().union(*(downstream[name] for name in running)), module
        if not running:
            outside.append(module)
    assert _keys(tiny_recipe) == before
    assert "ane_build.cli.main" in outside and "ane_build.tasks" in outside  # edits outside every closure exist


def _reads(stage, upstream_name, by_name=pipeline.BY_NAME):
    return any(up == upstream_name or _reads(by_name[up], upstream_name) for up in stage.upstream)


def test_the_code_that_drives_a_stage_is_in_its_key():
    export = set(import_graph.closure("ane_build.stages.export"))
    # The modules whose absence from a hand-kept list once let "cached" ship stale output.
    assert {"ane_build.programs.lowering", "ane_build.programs.saved_programs", "ane_build.quant.palettize", "ane_build.util.worker"} <= export
    assert {"ane_build.analysis.lint", "ane_build.analysis.ane_rules", "ane_build.programs.coreml_program"} <= export
    quantize = set(import_graph.closure("ane_build.stages.quantize"))
    assert {"ane_build.quant.palettize", "ane_build.programs.saved_programs", "ane_build.util.worker"} <= quantize
    assert "ane_build.stages" in quantize and "ane_build" in quantize  # the packages' __init__ run first


def test_modules_that_cannot_change_output_are_listed_with_a_reason_and_left_out():
    for name, reason in import_graph.NO_OUTPUT.items():
        assert name in import_graph.modules() and reason
        assert all(name not in import_graph.closure(stage.module_name) for stage in pipeline.STAGES)


@pytest.mark.parametrize("stage", [s.name for s in pipeline.STAGES])
def test_importing_a_stage_loads_no_package_module_outside_its_closure(stage):
    module = pipeline.BY_NAME[stage].module_name
    loaded = subprocess.run(
        [sys.executable, "-c", f"import json, sys, {module}; "
         "print(json.dumps(sorted(m for m in sys.modules if m == 'ane_build' or m.startswith('ane_build.'))))"],
        capture_output=True, text=True, check=True).stdout
    extra = set(json.loads(loaded)) - set(import_graph.closure(module)) - set(import_graph.NO_OUTPUT)
    assert not extra


def _fake_package(tmp_path, files):
    """ane_build/ under tmp_path with ``files`` ({relative path: text}) and empty harness modules."""
    root = tmp_path / "ane_build"
    for rel, text in {"__init__.py": "", "pipeline.py": "", "cache/__init__.py": "", "cache/store.py": "",
                      **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_imports_are_read_in_every_form(tmp_path):
    root = _fake_package(tmp_path, {
        "top.py": "import numpy as np\nfrom ane_build.sub import leaf\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "from . import sibling\nfrom ..other import thing\n"
                       "def later():\n    import yaml.constructor\n    import json\n",
        "sub/sibling.py": "",
        "other.py": "thing = 1\n",
        "unused.py": "import torch\n",
    })
    ours = {"ane_build", "ane_build.other", "ane_build.sub", "ane_build.sub.leaf", "ane_build.sub.sibling",
            "ane_build.top"}
    assert set(import_graph.closure("ane_build.top", root)) == ours | set(import_graph.HARNESS) | {"ane_build.cache"}
    assert set(import_graph.libraries("ane_build.top", root)) == {"numpy", "pyyaml"}  # json: stdlib; torch: unused
    assert set(import_graph.fingerprint("ane_build.top", root)) == {
        "ane_build/__init__.py", "ane_build/other.py", "ane_build/sub/__init__.py", "ane_build/sub/leaf.py",
        "ane_build/sub/sibling.py", "ane_build/top.py", "ane_build/pipeline.py", "ane_build/cache/__init__.py",
        "ane_build/cache/store.py"}


def test_an_optional_library_that_is_not_installed_is_keyed_as_absent(tmp_path):
    root = _fake_package(tmp_path, {"top.py": "try:\n    import surely_not_installed_here\nexcept ImportError:\n"
                                              "    pass\n"})
    assert import_graph.libraries("ane_build.top", root) == {"surely_not_installed_here": None}


def test_the_key_names_the_libraries_the_stage_imports():
    assert set(import_graph.libraries("ane_build.stages.convert")) >= {"gguf", "numpy", "safetensors", "torch"}
    assert "coremltools" in import_graph.libraries("ane_build.stages.export")
    assert "torch" not in import_graph.libraries("ane_build.stages.fetch")  # fetch copies bytes
