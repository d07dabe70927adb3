"""The release workflow passes its linters: zizmor (offline, nothing at medium severity or above) and
actionlint; and the rules those findings are about hold in the file itself, linters or not."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github/workflows/release.yml"


def tool(name):
    """The linter's executable: beside this Python's (the virtual environment the test extra went
    into), else on PATH. Missing: skipped, except in CI (CI=true), which installs the test extra."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() and os.access(here, os.X_OK) else shutil.which(name)
    if found is None:
        reason = f"{name} not found beside {sys.executable} or on PATH (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def test_zizmor_finds_nothing_at_medium_severity_or_above():
    proc = subprocess.run([tool("zizmor"), "--offline", "--min-severity", "medium", "--format", "json",
                           str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    findings = json.loads(proc.stdout or "null")
    assert proc.returncode == 0 and findings == [], proc.stdout + proc.stderr


def test_actionlint_finds_nothing():
    proc = subprocess.run([tool("actionlint"), "-no-color", str(WORKFLOW.relative_to(ROOT))],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def _steps(workflow):
    return [(name, step) for name, job in workflow["jobs"].items() for step in job["steps"]]


def test_every_action_is_pinned_to_a_commit_and_every_job_holds_least_permissions():
    text = WORKFLOW.read_text()
    workflow = yaml.safe_load(text)
    uses = re.findall(r"^\s*-?\s*uses:\s*(.*)$", text, re.M)
    assert uses and all(re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+(\.\d+)*", u) for u in uses), uses
    assert workflow["permissions"] == {}
    assert all(job["permissions"] == {"contents": "read"} for job in workflow["jobs"].values())
    checkouts = [step for _, step in _steps(workflow) if step.get("uses", "").startswith("actions/checkout@")]
    assert len(checkouts) == len(workflow["jobs"])
    assert all(step["with"]["persist-credentials"] is False for step in checkouts)


def test_no_expression_is_expanded_into_a_script():
    for name, step in _steps(yaml.safe_load(WORKFLOW.read_text())):
        assert "${{" not in step.get("run", ""), (name, step["run"])


def test_linux_jobs_install_the_cpu_torch_of_pyproject_before_the_project():
    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if re.match(r"torch\s*==", d)]
    assert len(pins) == 1
    torch = "pip install " + pins[0].replace(" ", "") + " --index-url https://download.pytorch.org/whl/cpu"
    workflow = yaml.safe_load(WORKFLOW.read_text())
    for name, job in workflow["jobs"].items():
        runs = [step.get("run", "") for step in job["steps"]]
        project = next(i for i, run in enumerate(runs) if run.startswith("pip install -e ."))
        if job["runs-on"].startswith("ubuntu"):
            assert runs.index(torch) < project, name
        else:  # macOS wheels are CPU-only already
            assert not any("torch" in run for run in runs), name
