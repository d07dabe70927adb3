"""The export stage's Neural Engine lint: lint.json and lint.md in the entry, a summary in the metrics,
and ``export.ane_lint``: error fails the stage in one line, warn logs one, off skips it."""

import json
import logging

import pytest
import torch

from ane_build import pipeline, recipe
from ane_build.analysis import lint
from ane_build.cache import import_graph, keys
from ane_build.model import io
from ane_build.stages import export
from ane_build.util.errors import UserError
from tests import lint_builds


def test_the_entry_holds_the_reports_and_the_metrics_their_summary(tmp_path_factory):
    entries, metrics = lint_builds.built(tmp_path_factory, "list")
    report = json.loads((entries["export"] / lint.JSON_FILE).read_text())
    assert (entries["export"] / lint.MARKDOWN_FILE).read_text() == lint.markdown(report)
    assert {k: metrics["export"][k] for k in ("lint_findings", "lint_allowlisted", "lint_by_rule")} == {
        "lint_findings": report["findings"], "lint_allowlisted": report["allowlisted"],
        "lint_by_rule": report["by_rule"]}
    assert report["allowlisted"] > 0  # the embedding lookup at least


class Rank5(torch.nn.Module):
    """A program the lint always flags: a rank-5 tensor."""

    def forward(self, x):
        return x.reshape(1, 2, 2, 2, 32).relu().reshape(1, 256) * 2


@pytest.fixture
def rank5_entry(tmp_path_factory, tmp_path, monkeypatch):
    """A quantize entry whose forward program is Rank5 (with the tiny model's spec); one process lowers."""
    monkeypatch.setenv("ANE_BUILD_JOBS", "1")
    entries, _ = lint_builds.built(tmp_path_factory, "tensor")
    spec = io.read_spec(entries["quantize"])
    entry = tmp_path / "quantize"
    entry.mkdir()
    program = torch.export.export(Rank5(), (torch.randn(1, 256, dtype=torch.float16),), strict=False)
    torch.export.save(program, entry / "forward.pt2")
    (entry / spec["tokenizer"]).write_bytes((entries["quantize"] / spec["tokenizer"]).read_bytes())
    io.write_spec(spec, entry)
    return entry


def run_export(entry, out, mode):
    out.mkdir()
    return export.run({"quantize": entry}, {"ane_lint": mode}, out)


def test_error_fails_the_stage_in_one_line(rank5_entry, tmp_path):
    with pytest.raises(UserError) as err:
        run_export(rank5_entry, tmp_path / "export", "error")
    message = str(err.value)
    assert message.startswith("export.ane_lint: model.pte: 2 findings outside the allowlist (rank 2; 0 allowlisted)")
    assert "first, rank: main reshape" in message and "rank 5: [1, 2, 2, 2, 32]" in message
    assert message.endswith("set it to warn to build anyway (lint.md lists them)") and "\n" not in message
    assert (tmp_path / "export" / lint.MARKDOWN_FILE).is_file()  # written before failing


def test_warn_builds_and_logs_one_line(rank5_entry, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ane_build"):
        metrics = run_export(rank5_entry, tmp_path / "export", "warn")
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("ane_build")]
    assert len(warnings) == 1 and warnings[0].startswith("export.ane_lint: model.pte: 2 findings outside")
    assert metrics["lint_findings"] == 2 and metrics["lint_by_rule"] == {"rank": 2}
    assert (tmp_path / "export" / export.MODEL_FILE).is_file() and (tmp_path / "export" / lint.JSON_FILE).is_file()


def test_off_lints_nothing(rank5_entry, tmp_path):
    metrics = run_export(rank5_entry, tmp_path / "export", "off")
    assert not [k for k in metrics if k.startswith("lint")]
    assert not (tmp_path / "export" / lint.JSON_FILE).exists() and not (tmp_path / "export" / lint.MARKDOWN_FILE).exists()


def tiny_recipe(**export_section):
    return recipe.validate({"source": {"path": "/models/tiny"}, "export": export_section}, "recipes/tiny/phone.yaml")


def test_recipes_default_to_error_and_the_setting_is_in_the_stage_key():
    assert tiny_recipe()["export"]["ane_lint"] == "error"
    stage = pipeline.BY_NAME["export"]
    stage_keys = {mode: keys.stage_key(keys.key_inputs(stage, pipeline.key_params(stage, tiny_recipe(ane_lint=mode),
                                                                                    None), {"quantize": "q"}))
                  for mode in ("error", "warn", "off")}
    assert len(set(stage_keys.values())) == 3
    assert {"ane_build.analysis.lint", "ane_build.analysis.ane_rules", "ane_build.programs.coreml_program"} <= set(
        import_graph.closure(stage.module_name))  # its code, in the key


def test_a_bad_setting_is_one_line():
    with pytest.raises(UserError) as err:
        tiny_recipe(ane_lint="strict")
    assert str(err.value) == "recipes/tiny/phone.yaml: export.ane_lint: expected one of error, warn, off; got 'strict'"
