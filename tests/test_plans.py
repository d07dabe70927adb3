import json
import os
import re
import subprocess
import sys

import pytest

from ane_build import plans
from ane_build.cache.filehash import sha256_file
from ane_build.cli import main as cli
from ane_build.util.errors import SourceMissing, display_path
from tests.test_tasks import ROOT, doit, make_project

WAITING = "description: Big model, which you download yourself\nsource: {path: ../../ckpt/big}\n"
BROKEN = "source: {path: ../../ckpt/tiny.gguf}\nquantize: {linear: c5w}\n"


@pytest.fixture
def project(tmp_path):
    """tiny/a and tiny/b that build, big/phone waiting for its checkpoint, and nothing broken yet."""
    project = make_project(tmp_path)
    (project / "recipes/big").mkdir()
    (project / "recipes/big/phone.yaml").write_text(WAITING)
    return project


WHY = ("waits for its checkpoint (Big model, which you download yourself): put it at {ckpt}/big "
       "(source.path of {recipes}/big/phone.yaml)")


def why(project, shown=display_path):
    return WHY.format(ckpt=shown(project / "ckpt"), recipes=shown(project / "recipes"))


def test_every_recipe_is_planned_or_says_why_not(project):
    (project / "recipes/tiny/broken.yaml").write_text(BROKEN)
    found = {rec["name"]: (planned, problem) for rec, planned, problem in
             plans.every_recipe(project / "recipes", sha256_file)}
    assert sorted(found) == ["big/phone", "tiny/a", "tiny/b", "tiny/broken"]
    assert found["tiny/a"][0]["release"][0] and found["tiny/a"][1] is None
    assert isinstance(found["big/phone"][1], SourceMissing)
    assert "quantize.linear" in str(found["tiny/broken"][1]) and not isinstance(found["tiny/broken"][1], SourceMissing)
    assert [plans.order(problem) for _, problem in (found[n] for n in ("tiny/a", "big/phone", "tiny/broken"))] == [0, 1, 2]


def test_a_group_builds_what_it_can_and_skips_a_recipe_waiting_for_its_checkpoint_in_one_line(project):
    proc = doit(project, "fetch")
    assert re.findall(r"^built  fetch:tiny/\w", proc.stdout, re.M) == ["built  fetch:tiny/a"]
    skipped = [line for line in proc.stdout.splitlines() if "big/phone" in line]
    with_cwd = why(project, lambda path: os.path.relpath(path, ROOT))  # doit runs beside dodo.py
    assert skipped == [f"skipped big/phone: {with_cwd}"]
    proc = doit(project, "convert")  # its later stages too: one line for the recipe, not one per stage
    assert [line for line in proc.stdout.splitlines() if "big/phone" in line] == [f"skipped big/phone: {with_cwd}"]


def test_a_waiting_recipe_named_alone_fails_in_one_line(project):
    proc = doit(project, "convert:big/phone", check=False)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and errors[0].endswith("ckpt/big does not exist")


def test_a_broken_recipe_fails_the_group_after_the_others_are_built(project):
    (project / "recipes/tiny/broken.yaml").write_text(BROKEN)
    listed = doit(project, "list")
    assert "fetch:tiny/broken" in listed.stdout  # doit list works
    proc = doit(project, "fetch", check=False)
    assert proc.returncode != 0
    lines = proc.stdout.splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    assert lines[error].endswith("recipes/tiny/broken.yaml: quantize.linear: expected one of none, c4w, b4w, c8w, "
                                 "lut4, lut6, source; got 'c5w'")
    assert any(line.startswith("built  fetch:tiny/a") for line in lines[:error])
    assert any(line.startswith("skipped big/phone") for line in lines[:error])
    entries = [p for p in (project / "artifacts/store/fetch").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1  # tiny/a's (and tiny/b's): the broken recipe published nothing


def test_status_shows_every_recipe_and_says_why_one_cannot_be_planned(project, capsys):
    (project / "recipes/tiny/broken.yaml").write_text(BROKEN)
    args = ["status", "--recipes-dir", str(project / "recipes"), "--artifacts", str(project / "a")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"big/phone  skipped  {why(project)}" in out
    broken = [line for line in out if line.startswith("tiny/broken  error  ")]
    assert len(broken) == 1 and broken[0].endswith("quantize.linear: expected one of none, c4w, b4w, c8w, lut4, "
                                                   "lut6, source; got 'c5w'")
    assert sum(line.startswith("release:tiny/") for line in out) == 2
    assert cli.main([*args, "--strict"]) == 1


def test_status_of_a_waiting_recipe_named_alone_is_an_error(project):
    proc = subprocess.run([sys.executable, "-m", "ane_build.cli.main", "status", str(project / "recipes/big/phone.yaml"),
                           "--recipes-dir", str(project / "recipes"), "--artifacts", str(project / "a")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.endswith("ckpt/big does not exist\n")


def test_ci_plan_plans_what_it_can_and_names_the_skipped_on_stderr(project, capsys):
    args = ["ci", "plan", "--recipes-dir", str(project / "recipes"), "--artifacts", str(project / "a")]
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert [job["recipe"] for job in json.loads(out)["release"]["include"]] == ["tiny/a", "tiny/b"]
    assert err.splitlines() == [f"skipped big/phone: {why(project)}"]
    (project / "recipes/tiny/broken.yaml").write_text(BROKEN)
    assert cli.main(args) == 1
    assert "tiny/broken.yaml: quantize.linear" in capsys.readouterr().err


def test_the_shipped_recipes_plan_or_wait_for_a_checkpoint():
    """On a fresh clone: the SmolLM2 recipes plan, the Llama one waits for the user's checkpoint."""
    root = cli.Path(__file__).resolve().parents[1]
    for rec, planned, problem in plans.every_recipe(root / "recipes", sha256_file):
        assert planned or (rec["name"].startswith("llama") and plans.waiting(rec, problem)), problem
