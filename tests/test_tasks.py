"""doit behaviour on a tiny project: caching, sharing, views, corruption, SIGKILL, one-line errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ane_build import pipeline, schema
from ane_build.bundle.verify import ARCHIVE_SUFFIX
from ane_build.cache.filehash import sha256_file
from tests.tiny_llama import tiny_params, tiny_weights, write_gguf

ROOT = Path(__file__).resolve().parents[1]
DEVICE_A = "extends: ../_base/tiny.yaml\ndevice: phone\n"
DEVICE_B = "extends: ../_base/tiny.yaml\ndevice: tablet\nexport: {compute_unit: ALL}\n"


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path)


def make_project(folder):
    """A recipes folder with two devices of one tiny GGUF model, and an empty artifacts folder."""
    params = tiny_params()
    (folder / "ckpt").mkdir()
    write_gguf(params, tiny_weights(params), folder / "ckpt" / "tiny.gguf")
    (folder / "recipes/_base").mkdir(parents=True)
    (folder / "recipes/tiny").mkdir()
    (folder / "recipes/_base/tiny.yaml").write_text("source: {path: ../../ckpt/tiny.gguf}\n")
    (folder / "recipes/tiny/a.yaml").write_text(DEVICE_A)
    (folder / "recipes/tiny/b.yaml").write_text(DEVICE_B)
    return folder


def doit(project, *args, check=True, artifacts="artifacts"):
    env = {**os.environ, "ANE_BUILD_RECIPES": str(project / "recipes"),
           "ANE_BUILD_ARTIFACTS": str(project / artifacts), "ANE_BUILD_DEFAULT": "tiny/a"}
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args],
                          env=env, capture_output=True, text=True, cwd=project)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def executed(proc):
    """Task names doit ran ("start name"), as opposed to found up to date ("cached name  up to date")."""
    return re.findall(r"^start  (\S+)$", proc.stdout, re.M)


def built(proc, stage):
    return len(re.findall(rf"^built  {stage}:\S+  \d+\.\d s  \S+$", proc.stdout, re.M))


def test_second_run_executes_nothing(project):
    first = doit(project, "convert:tiny/a")
    assert executed(first) == ["fetch:tiny/a", "convert:tiny/a"]
    assert executed(doit(project, "convert:tiny/a")) == []


def test_default_task_is_the_default_recipes_last_stage(project):
    code = "import runpy, sys; print(runpy.run_path(sys.argv[1])['DOIT_CONFIG']['default_tasks'])"
    env = {**os.environ, "ANE_BUILD_ARTIFACTS": str(project / "artifacts"), "ANE_BUILD_DEFAULT": "tiny/a"}
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dodo.py")], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "['release:tiny/a']"


def test_two_devices_share_one_convert_entry_built_once(project):
    proc = doit(project, "convert")
    assert built(proc, "convert") == 1 and built(proc, "fetch") == 1
    assert len(list((project / "artifacts/store/convert").glob("[0-9a-f]*"))) == 1
    a = (project / "artifacts/recipes/tiny/a/convert").resolve()
    assert a == (project / "artifacts/recipes/tiny/b/convert").resolve()


def test_editing_a_later_stage_field_keeps_fetch_and_convert(project):
    doit(project, "convert:tiny/a")
    (project / "recipes/tiny/a.yaml").write_text(DEVICE_A + "quantize: {linear: b4w}\nexport: {compute_unit: CPU_ONLY}\n")
    assert executed(doit(project, "convert:tiny/a")) == []


def test_editing_the_convert_field_rebuilds_convert_only(project):
    doit(project, "convert:tiny/a")
    (project / "recipes/tiny/a.yaml").write_text(DEVICE_A + "convert: {format: gguf}\n")
    proc = doit(project, "convert:tiny/a")
    assert executed(proc) == ["convert:tiny/a"] and built(proc, "convert") == 1


def test_deleting_the_views_rebuilds_nothing_and_restores_them(project):
    doit(project, "convert:tiny/a")
    subprocess.run(["rm", "-r", str(project / "artifacts/recipes")], check=True)
    assert executed(doit(project, "convert:tiny/a")) == []
    assert (project / "artifacts/recipes/tiny/a/convert/params.json").is_file()


def test_corrupted_store_file_rebuilds_that_stage(project):
    doit(project, "convert:tiny/a")
    weights = project / "artifacts/recipes/tiny/a/convert/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    proc = doit(project, "convert:tiny/a")
    assert executed(proc) == ["convert:tiny/a"] and built(proc, "convert") == 1


def test_forget_reruns_the_task_without_rebuilding(project):
    doit(project, "convert:tiny/a")
    doit(project, "forget", "convert:tiny/a")
    proc = doit(project, "convert:tiny/a")
    assert executed(proc) == ["convert:tiny/a"] and built(proc, "convert") == 0


def test_clean_removes_the_entry_and_the_next_run_rebuilds_it(project):
    doit(project, "convert:tiny/a")
    doit(project, "clean", "convert:tiny/a")
    assert not (project / "artifacts/recipes/tiny/a/convert").exists()
    assert built(doit(project, "convert:tiny/a"), "convert") == 1


def test_sigkill_mid_convert_leaves_no_entry_and_the_next_run_completes(project):
    doit(project, "fetch:tiny/a")
    env = {**os.environ, "ANE_BUILD_RECIPES": str(project / "recipes"),
           "ANE_BUILD_ARTIFACTS": str(project / "artifacts")}
    proc = subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "convert:tiny/a"],
                            env=env, cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    convert_dir = project / "artifacts/store/convert"
    deadline = time.time() + 60
    while not list(convert_dir.glob(".tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "convert finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(convert_dir.glob("[0-9a-f]*"))  # nothing published
    assert executed(doit(project, "convert:tiny/a")) == ["convert:tiny/a"]
    assert not list(convert_dir.glob(".tmp-*"))  # the half-entry was swept
    assert (project / "artifacts/recipes/tiny/a/convert/model.safetensors").is_file()


def test_list_shows_every_stage_and_recipe_and_imports_no_torch(project):
    # A calibrating recipe too: its calibrate key reads the calibration text's hash, not torch.
    (project / "recipes/tiny/c.yaml").write_text(DEVICE_A + "quantize: {linear: lut6, palette_group: 16, fit: gptq}\n")
    names = doit(project, "list").stdout.split()
    assert {"fetch:tiny/a", "convert:tiny/a", "fetch:tiny/b", "convert:tiny/b"} <= set(names)
    code = ("import sys, runpy; runpy.run_path(sys.argv[1])['task_ane_build']().__next__();"
            "assert 'torch' not in sys.modules, 'dodo imported torch'")
    env = {**os.environ, "ANE_BUILD_RECIPES": str(project / "recipes"), "ANE_BUILD_ARTIFACTS": str(project / "artifacts")}
    subprocess.run([sys.executable, "-c", code, str(ROOT / "dodo.py")], env=env, check=True)


def test_only_recipes_with_a_data_aware_quantizer_calibrate_and_every_device_shares_it(project):
    from ane_build import plans
    from ane_build.cache.store import Store

    fisher = "quantize: {linear: lut4, palette_group: 16, fit: fisher}\n"
    (project / "recipes/tiny/c.yaml").write_text(DEVICE_A + fisher)
    (project / "recipes/tiny/d.yaml").write_text(DEVICE_B + fisher + "ane: {seq_length: 4}\n")
    names = set(doit(project, "list").stdout.split())
    assert {"calibrate:tiny/c", "calibrate:tiny/d"} <= names and "calibrate:tiny/a" not in names
    planned = {rec["name"]: stages for rec, stages, _ in plans.every_recipe(project / "recipes",
                                                                              Store(project / "artifacts").hasher)}
    assert "calibrate" not in planned["tiny/a"]
    assert planned["tiny/c"]["calibrate"][0] == planned["tiny/d"]["calibrate"][0]
    assert planned["tiny/c"]["quantize"][1]["upstream"] == {"rewrite": planned["tiny/c"]["rewrite"][0],
                                                            "calibrate": planned["tiny/c"]["calibrate"][0]}
    assert planned["tiny/a"]["quantize"][1]["upstream"] == {"rewrite": planned["tiny/a"]["rewrite"][0]}


def test_a_calibrated_quantize_builds_after_calibrate_and_a_second_device_reuses_it(project):
    fisher = "quantize: {linear: lut4, palette_group: 16, fit: gptq}\ncalibrate: {windows: 2, window_tokens: 8}\n"
    (project / "recipes/tiny/c.yaml").write_text(DEVICE_A + fisher)
    (project / "recipes/tiny/d.yaml").write_text(DEVICE_B + fisher + "ane: {seq_length: 4}\n")
    first = executed(doit(project, "quantize:tiny/c"))
    assert first.index("calibrate:tiny/c") < first.index("quantize:tiny/c")
    second = doit(project, "quantize:tiny/d")
    assert built(second, "calibrate") == 0 and built(second, "quantize") == 1


def test_bad_recipe_is_one_line_and_nonzero(project):
    (project / "recipes/tiny/a.yaml").write_text(DEVICE_A + "quantize: {linear: c5w}\n")
    assert "convert:tiny/a" in doit(project, "list").stdout  # listed: the other recipes stay usable
    proc = doit(project, "convert:tiny/a", check=False)
    assert proc.returncode != 0
    kinds = ", ".join(schema.SCHEMA["quantize"]["linear"].choices)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].endswith(f"recipes/tiny/a.yaml: quantize.linear: expected one of {kinds}; got 'c5w'")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not [p for p in (project / "artifacts/store").glob("*/*") if not p.name.startswith(".")]


def test_missing_source_path_fails_its_task_in_one_line(project):
    (project / "recipes/tiny/a.yaml").write_text(DEVICE_A + "source: {path: /nonexistent/model.gguf}\n")
    proc = doit(project, "convert:tiny/a", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("source.path: /nonexistent/model.gguf does not exist")
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(project, doit's output) of a tiny recipe built through release. In fp32 and unquantized, so
    that the random tiny model follows its fp32 reference through smoke (sampled: greedy, random
    weights fall into a loop); so without the Neural Engine lint, which refuses fp32 compute."""
    project = make_project(tmp_path_factory.mktemp("released"))
    (project / "recipes/tiny/a.yaml").write_text(DEVICE_A + "ane: {dtype: fp32}\nquantize: {linear: none}\n"
                                                 "smoke: {temperature: 1.0}\nexport: {ane_lint: 'off'}\n")
    return project, doit(project, "release:tiny/a")


def test_a_build_prints_one_line_as_each_stage_starts_and_one_as_it_ends(released):
    """Non-interactive, as in CI: the stages' own output goes to their logs, none to the console."""
    project, proc = released
    stages = [stage.name for stage in pipeline.stages_of({})]  # no calibrate: its quantizers are data-free
    expected = [f"{verb}  {stage}:tiny/a" for stage in stages for verb in ("start", "built")]
    assert [" ".join(line.split()[:2]).replace(" ", "  ") for line in proc.stdout.splitlines()] == expected
    assert [built(proc, stage) for stage in stages] == [1] * len(stages)
    assert proc.stderr == ""  # the libraries' notices about themselves stay in the stage logs
    assert not re.search(r"\r|%\||cpuinfo|Registering override", proc.stdout + proc.stderr)  # bars, native notes
    logs = project / "artifacts/logs/tiny/a"
    assert sorted(p.stem for p in logs.iterdir()) == sorted(stages)
    assert "CoreMLPartitioner" in (logs / "export.log").read_text()  # what the console was spared
    # coremltools' note on the torch version, in the log of whichever stage imported it first
    assert "has not been tested with coremltools" in "".join(p.read_text() for p in logs.iterdir())


def test_the_same_recipe_built_in_another_folder_gives_the_same_bytes(released):
    """Every file of the bundle, model.pte (Core ML) and its archive included, and the CPU twin."""
    project, _ = released
    doit(project, "release:tiny/a", artifacts="again")
    first, again = (project / folder / "release/tiny/a" for folder in ("artifacts", "again"))
    names, again_names = (sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                          for folder in (first, again))
    assert names == again_names and {"model.pte", "runner/include/ane_runner.h"} <= set(names)
    for name in names:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    twins = [project / folder / "recipes/tiny/a/export/twin.pte" for folder in ("artifacts", "again")]
    assert twins[0].read_bytes() == twins[1].read_bytes()
    # The manifest (the same bytes in both, checked above) lists every file of the bundle but itself and
    # the archive, each with the sha256 both builds' files have: what it records is what was rebuilt.
    manifest = json.loads((first / "manifest.json").read_text())
    assert sorted([*manifest["files"], "manifest.json", manifest["bundle"] + ARCHIVE_SUFFIX]) == names
    recorded = {name: meta["sha256"] for name, meta in manifest["files"].items()}
    for folder in (first, again):
        assert {name: sha256_file(folder / name) for name in recorded} == recorded, folder


def test_verbosity_2_shows_the_stages_own_output(project):
    proc = doit(project, "-v", "2", "convert:tiny/a")
    assert "read GGUF" in proc.stderr and not (project / "artifacts/logs").exists()
