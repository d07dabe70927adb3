"""``ane-build lint``: a .pte's Core ML functions (tiny ones the export stage built), an .mlpackage,
the report, exit statuses, and one error line for each kind of bad input."""

import json
import sys

import pytest

from ane_build.analysis import lint
from ane_build.cli import main as cli
from ane_build.stages import export
from tests import lint_builds, mil_programs


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packages")
    return {name: mil_programs.save(name, folder) for name in ("static_dim", "rank5", "embedding")}


def run(capsys, *args):
    """(exit status, stdout, stderr) of ``ane-build lint ARGS``."""
    status = cli.main(["lint", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_clean_package_exits_0(packages, capsys):
    status, out, _ = run(capsys, packages["static_dim"])
    assert status == 0 and "**Clean**: no finding outside the allowlist (0 allowlisted)." in out


def test_findings_exit_1_with_the_rule_the_op_and_its_shape(packages, capsys):
    status, out, _ = run(capsys, packages["rank5"])
    assert status == 1 and "## rank: 2 (community, check)" in out
    assert "| main | reshape | float16 [2, 3, 4, 2, 32] | rank 5: [2, 3, 4, 2, 32] | 1 | `reshape_0` |" in out
    status, out, _ = run(capsys, packages["rank5"], "--json")
    report = json.loads(out)
    assert status == 1 and not report["clean"] and report["by_rule"] == {"rank": 2}
    assert [(i["op"], i["tensors"][0]["shape"]) for i in report["items"]] == [("reshape", [2, 3, 4, 2, 32]),
                                                                               ("relu", [2, 3, 4, 2, 32])]
    rule = next(r for r in report["rules"] if r["id"] == "rank")
    assert rule["evidence"] == "community" and rule["sources"] and rule["findings"] == 2


def test_allowlisted_findings_are_shown_and_do_not_fail(packages, capsys):
    status, out, _ = run(capsys, packages["embedding"])
    assert status == 0 and "## Allowlisted: input-lookups (8)" in out
    assert "| main | gather | gather | float16 [1, 64, 64] | from [512, 64] at run-time indices |" in out


def test_every_function_of_a_multifunction_pte_is_read(tmp_path_factory):
    entries, _ = lint_builds.built(tmp_path_factory, "list")
    report = lint.lint(entries["export"] / export.MODEL_FILE)
    assert [(m["label"], list(m["functions"])) for m in report["models"]] == [
        ("partition 1 (forward, prefill)", ["forward", "prefill"])]
    assert {i["function"] for i in report["items"]} == {"forward", "prefill"}


def test_it_prints_what_the_export_stage_wrote(tmp_path_factory, capsys):
    entries, _ = lint_builds.built(tmp_path_factory, "list")
    pte, written = entries["export"] / export.MODEL_FILE, json.loads((entries["export"] / lint.JSON_FILE).read_text())
    status, out, _ = run(capsys, pte)
    assert status == (0 if written["clean"] else 1)
    assert out == (entries["export"] / lint.MARKDOWN_FILE).read_text()
    assert json.loads(run(capsys, pte, "--json")[1]) == written


def test_rank_5_caches_are_flagged(tmp_path_factory):
    """use_cache_list: false keeps every layer's cache in one 5-D tensor."""
    entries, _ = lint_builds.built(tmp_path_factory, "tensor")
    report = lint.lint(entries["export"] / export.MODEL_FILE)
    inputs = {i["name"]: i["tensors"][0]["shape"] for i in report["items"] if i["rule"] == "rank" and i["op"] == "input"}
    # [n_layers, 1, n_kv_heads, slots, head_dim], keys as values (no longer transposed).
    assert inputs == {"k_caches": [2, 1, 2, 96, 64], "v_caches": [2, 1, 2, 96, 64]}
    assert not report["clean"]


def test_our_tiny_model_lints_clean(tmp_path_factory):
    entries, _ = lint_builds.built(tmp_path_factory, "list")
    report = lint.lint(entries["export"] / export.MODEL_FILE)
    assert report["clean"], lint.summary(report)
    # The prefill's 127-column mask, which upstream's convention fixes, is allowed; the decode's is aligned.
    fixed = {(i["function"], i["name"]) for i in report["items"] if i["allowed"] == "upstream-convention"}
    assert ("prefill", "attn_mask") in fixed and ("forward", "attn_mask") not in fixed


def bad_inputs(root, twin):
    """{what: (path, the error after it)}."""
    (root / "notes.pte").write_text("not a program\n")
    (root / "cut.pte").write_bytes(twin.read_bytes()[:4096])
    (root / "broken.mlpackage").mkdir()
    (root / "broken.mlpackage" / "Manifest.json").write_text("{")
    return {
        "missing": (root / "absent.pte", "no such file or folder"),
        "not a program": (root / "notes.pte", "not an ExecuTorch program (.pte) or a Core ML package (.mlpackage)"),
        "cut short": (root / "cut.pte", "not a readable ExecuTorch program ("),
        "no Core ML": (twin, "no Core ML program inside (its delegates: XnnpackBackend)"),
        "unreadable package": (root / "broken.mlpackage", "cannot read its Core ML model ("),
    }


@pytest.mark.parametrize("what", ["missing", "not a program", "cut short", "no Core ML", "unreadable package"])
def test_bad_input_is_one_line_and_exit_2(tmp_path_factory, tmp_path, capsys, what):
    entries, _ = lint_builds.built(tmp_path_factory, "tensor")
    path, problem = bad_inputs(tmp_path, entries["export"] / export.TWIN_FILE)[what]
    status, out, err = run(capsys, path)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and out == "" and len(errors) == 1
    assert errors[0].startswith(f"error: {path}: {problem}")


@pytest.mark.skipif(sys.platform == "darwin", reason="a Mac may have Core ML's compute plan")
def test_the_device_plan_needs_a_mac(packages, capsys):
    status, out, err = run(capsys, packages["static_dim"], "--device-plan")
    assert status == 2 and out == ""
    assert err.splitlines()[-1] == "error: --device-plan: needs macOS 14.4+ with Core ML (MLComputePlan); this is Linux"
