"""ane-build ci plan / pull, the fan-out over runners it plans, and the workflow that consumes it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ane_build import pipeline, recipe
from ane_build.cache.remote import Remote
from ane_build.cache.store import Store
from ane_build.cli import ci
from tests.tiny_llama import tiny_params, tiny_weights, write_gguf

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github/workflows/release.yml"
# fp32 and unquantized so that the random tiny model passes smoke (sampled: greedy falls into a loop);
# its fp32 Core ML program breaks the Neural Engine lint, so that warns.
BASE = ("source: {path: ../../ckpt/tiny.gguf}\nane: {dtype: fp32}\nquantize: {linear: none}\n"
        "export: {ane_lint: warn}\nsmoke: {temperature: 1.0}\n")
DEVICES = {  # a and b share every stage up to quantize; c shares fetch and convert with them
    "tiny/a": "extends: ../_base/tiny.yaml\ndevice: phone\n",
    "tiny/b": "extends: ../_base/tiny.yaml\ndevice: tablet\nexport: {compute_unit: ALL}\n",
    "tiny/c": "extends: ../_base/tiny.yaml\ndevice: watch\nane: {seq_length: 16}\n",
}


@pytest.fixture
def project(tmp_path):
    params = tiny_params()
    (tmp_path / "ckpt").mkdir()
    write_gguf(params, tiny_weights(params), tmp_path / "ckpt/tiny.gguf")
    (tmp_path / "recipes/_base").mkdir(parents=True)
    (tmp_path / "recipes/_base/tiny.yaml").write_text(BASE)
    for name, text in DEVICES.items():
        path = tmp_path / f"recipes/{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    return tmp_path


def run(project, *args, env=None, check=True):
    env = {**os.environ, "ANE_BUILD_RECIPES": str(project / "recipes"), "ANE_BUILD_CONFIG": str(project / "none.toml"),
           "ANE_BUILD_JOBS": "1", **(env or {})}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=project)
    assert not check or proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def plan_of(project, *recipes):
    return json.loads(run(project, sys.executable, "-m", "ane_build.cli.main", "ci", "plan", *recipes).stdout)


def keys_of(project, name):
    rec = recipe.load(project / f"recipes/{name}.yaml", project / "recipes")
    return {stage: key for stage, (key, _) in pipeline.plan(rec, Store(project / "scratch").hasher).items()}


def test_plan_builds_the_deepest_shared_stages_once_then_each_release(project):
    plan = plan_of(project)
    keys = {name: keys_of(project, name) for name in DEVICES}
    # c shares convert with a and b, but a's quantize holds that convert already: one target.
    assert plan["prefix"] == {"include": [{"name": "shared: quantize:tiny/a", "targets": "quantize:tiny/a"}]}
    assert plan["release"] == {"include": [
        {"name": name, "recipe": name, "targets": f"release:{name}", "key": keys[name]["release"]} for name in DEVICES]}
    assert keys["tiny/a"]["quantize"] == keys["tiny/b"]["quantize"] != keys["tiny/c"]["quantize"]
    assert keys["tiny/a"]["convert"] == keys["tiny/c"]["convert"]


def test_plan_of_recipes_that_share_nothing_has_no_prefix_job(project):
    plan = plan_of(project, "tiny/a", "recipes/tiny/c.yaml")  # names or files
    assert plan["prefix"] == {"include": [{"name": "shared: convert:tiny/a", "targets": "convert:tiny/a"}]}
    assert plan_of(project, "tiny/a")["prefix"] == {"include": []}


def test_a_plan_of_two_groups_has_a_prefix_job_each():
    recipes = [{"name": n} for n in ("m/a", "m/b", "n/a", "n/b", "o/a")]
    stages = [s.name for s in pipeline.stages_of({})]  # the stages of a recipe without calibration
    depth = {"m": 3, "n": 1, "o": 0}  # how many leading stages the recipes of a model share

    def plan(name):
        model, device = name.split("/")
        return {s: (f"{model}-{s}" if i < depth[model] else f"{name}-{s}", None) for i, s in enumerate(stages)}

    matrix = ci.plan(recipes, {r["name"]: plan(r["name"]) for r in recipes})
    assert [job["targets"] for job in matrix["prefix"]["include"]] == ["rewrite:m/a", "fetch:n/a"]


def built_entries(output):
    """(stage, key) of every entry a doit output says it built."""
    return re.findall(r"^built  (\w+):\S+  \d+\.\d s  \S+/store/\w+/([0-9a-f]{64})$", output, re.M)


def test_runners_running_the_plan_build_each_stage_once_and_push_every_release(project, s3, tmp_path):
    """Each job its own process and artifacts folder, one S3 bucket between them, jobs of one level at once."""
    url = s3.url("fanout")
    env = {"ANE_BUILD_CACHE": url}
    plan = plan_of(project, "tiny/a", "tiny/b")
    outputs = []
    for level in ("prefix", "release"):
        jobs = [subprocess.Popen([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *job["targets"].split()],
                                 cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, **env, "ANE_BUILD_RECIPES": str(project / "recipes"),
                                      "ANE_BUILD_CONFIG": str(project / "none.toml"), "ANE_BUILD_JOBS": "1",
                                      "ANE_BUILD_ARTIFACTS": str(tmp_path / f"runner-{level}-{i}")})
                for i, job in enumerate(plan[level]["include"])]
        for job in jobs:
            outputs.append(job.communicate()[0])
            assert job.returncode == 0, outputs[-1]
    built = [entry for output in outputs for entry in built_entries(output)]
    every = {(stage, key) for name in ("tiny/a", "tiny/b") for stage, key in keys_of(project, name).items()}
    assert sorted(built) == sorted(every)  # every stage of both, none twice
    assert [stage for stage, _ in built_entries(outputs[0])] == ["fetch", "convert", "rewrite", "quantize"]
    releases = [job["key"] for job in plan["release"]["include"]]
    assert all(Remote(url).lookup("release", key) for key in releases)

    pulled = run(project, sys.executable, "-m", "ane_build.cli.main", "pull", "tiny/b", "--key", releases[1],
                 "--artifacts", str(tmp_path / "mac"), env=env)
    bundle = tmp_path / "mac/release/tiny/b"
    assert pulled.stdout == f"{bundle}\n" and (bundle / "model.pte").is_file()
    run(project, sys.executable, "-m", "ane_build.cli.main", "verify", str(bundle))
    assert [p.name for p in (tmp_path / "mac/store").iterdir() if p.is_dir()] == ["release"]  # nothing else

    wrong = run(project, sys.executable, "-m", "ane_build.cli.main", "pull", "tiny/a", "--key", releases[1],
                "--artifacts", str(tmp_path / "mac2"), env=env, check=False)
    assert wrong.returncode == 1 and wrong.stderr == f"error: --key {releases[1]}: is the release of tiny/b, not of tiny/a\n"


def test_pull_of_a_release_not_in_the_remote_is_one_line(project, tmp_path):
    proc = run(project, sys.executable, "-m", "ane_build.cli.main", "pull", "tiny/a", "--artifacts", str(tmp_path / "a"),
               env={"ANE_BUILD_CACHE": f"file://{tmp_path}/empty"}, check=False)
    key = keys_of(project, "tiny/a")["release"]
    assert proc.returncode == 1 and proc.stderr == (
        f"error: release:tiny/a: file://{tmp_path}/empty/release/{key} is not in the remote cache; "
        "build it first (doit release:tiny/a)\n")
    no_cache = run(project, sys.executable, "-m", "ane_build.cli.main", "pull", "tiny/a", check=False)
    assert no_cache.returncode == 1 and no_cache.stderr.count("\n") == 1 and "no remote cache set" in no_cache.stderr


def _matrix_fields(job):
    return set(re.findall(r"matrix\.(\w+)", yaml.safe_dump(job)))


def test_the_workflow_runs_the_plan_it_asks_for(project):
    """The GitHub Actions workflow: its plan job's output feeds the matrices, and each job reads from
    its matrix entry only fields that a plan's entries have."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    assert set(workflow[True]) == {"push", "pull_request", "workflow_dispatch"}  # YAML 1.1 reads `on` as true
    [plan_step] = [step for step in jobs["plan"]["steps"] if step.get("id") == "plan"]
    assert "$(ane-build ci plan $RECIPES)" in plan_step["run"]
    assert jobs["plan"]["outputs"]["plan"] == "${{ steps.plan.outputs.plan }}"
    for recipe_name in workflow["env"]["RECIPES"].split():  # shipped recipes
        assert (ROOT / "recipes" / f"{recipe_name}.yaml").is_file()
    plan = plan_of(project)
    for name, level, needs in (("prefix", "prefix", "plan"), ("release", "release", "prefix"),
                               ("mac", "release", "release")):
        job = jobs[name]
        assert job["strategy"]["matrix"] == f"${{{{ fromJSON(needs.plan.outputs.plan).{level} }}}}"
        assert needs in ([job["needs"]] if isinstance(job["needs"], str) else job["needs"])
        assert plan[level]["include"] and all(_matrix_fields(job) <= set(entry) for entry in plan[level]["include"])
    runs = {name: [step.get("run", "") for step in jobs[name]["steps"]] for name in jobs}
    # matrix fields reach the scripts through the job's env, never expanded into a script
    assert jobs["prefix"]["env"]["TARGETS"] == jobs["release"]["env"]["TARGETS"] == "${{ matrix.targets }}"
    assert all(any(r.endswith("\ndoit $TARGETS\n") for r in runs[name]) for name in ("prefix", "release"))
    # DEFAULT_RECIPE: the recipe whose bundle the Mac job also runs with the native runner; doit's default.
    default = re.search(r'"ANE_BUILD_DEFAULT", "([^"]+)"', (ROOT / "dodo.py").read_text())[1]
    assert jobs["mac"]["env"] == {"RECIPE": "${{ matrix.recipe }}", "KEY": "${{ matrix.key }}",
                                  "DEFAULT_RECIPE": default}
    assert default in workflow["env"]["RECIPES"].split()
    assert 'ane-build pull "$RECIPE" --key "$KEY"' in runs["mac"]
    assert any(r.startswith('ane-build run -m "artifacts/release/$RECIPE/model.pte"') for r in runs["mac"])
    assert jobs["mac"]["runs-on"].startswith("macos")
    assert workflow["env"]["ANE_BUILD_CACHE_MODE"] == (
        "${{ github.event_name == 'pull_request' && 'read' || 'readwrite' }}")
