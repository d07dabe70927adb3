"""Smoke on real tiny Core ML exports: model.pte's Core ML program is interpreted beside the twin,
reported in smoke.json and smoke.md, held to the same gates; a payload damaged as a conversion bug
would damage it fails smoke on the Core ML program, by name, while the twin passes.

Builds (each its export stage's own model.pte and twin.pte, from a SentencePiece checkpoint):

- "fp32-c8w": fp32, c8w with zero points, over weights already on that grid (each row's int8
  codes times a scale, its extremes -128 and 127): quantizing loses nothing, so a correct
  program agrees with the fp32 reference at every position (to fp32 rounding) and the gates can
  be the strictest, top-1 1.0;
- "fp16-c8w": the default recipe in miniature (fp16, c8w with zero points, a decode method);
- "fp16-lut4": 4-bit palettes.

On the fp16 builds the tiny random model's own agreement with fp32 is what it is (quantization,
fp16): the gates there are the ones its twin meets, exactly.
"""

import json

import pytest
import torch

from ane_build.checkpoint import canonical
from ane_build.stages import export, quantize, rewrite, smoke
from ane_build.util.errors import UserError
from tests import coreml_damage
from tests.stages.tiny_entries import ane
from tests.stages.tiny_export import SMOKE
from tests.tiny_llama import sentencepiece_model, tiny_params, tiny_weights

PARAMS = tiny_params(head_dim=32)
BUILDS = {
    "fp32-c8w": ("fp32", {"linear": "c8w", "mapping": "asymmetric"}),
    "fp16-c8w": ("fp16", {"linear": "c8w", "mapping": "asymmetric", "embedding": "8,0"}),
    "fp16-lut4": ("fp16", {"linear": "lut4", "palette_group": 16}),
}
INTERPRETED = {**SMOKE, "interpret_coreml": True, "coreml_eval_tokens": 64}  # a slice of the text
NO_GATES = {"min_top1_agreement": 0.0, "max_mean_kld": 1e9}


def on_grid(weights):
    """``weights`` with each linear's rows on an int8 grid that spans it: codes -128..127 times a scale."""
    out = dict(weights)
    for name, w in weights.items():
        if w.ndim == 2 and name != "tok_embeddings.weight":
            scale = w.abs().amax(1, keepdim=True) / 127
            codes = (w / scale).round().clamp(-128, 127)
            rows = torch.arange(len(codes))
            codes[rows, w.argmin(1)], codes[rows, w.argmax(1)] = -128, 127
            out[name] = codes * scale
    return out


def build(root, name):
    """{"convert", "export"}: a checkpoint and its export entry through the real stages."""
    dtype, quantize_params = BUILDS[name]
    weights = tiny_weights(PARAMS)
    dirs = {"convert": root / "convert"}
    dirs["convert"].mkdir(parents=True)
    canonical.write(canonical.Checkpoint(PARAMS, on_grid(weights) if dtype == "fp32" else weights,
                                         "tokenizer.model", sentencepiece_model(), bos_id=1, eos_ids=[2]),
                    dirs["convert"])
    stages = (("rewrite", rewrite, ane(dtype=dtype, seq_length=32, max_seq_length=96, decode_method=True),
               "convert"), ("quantize", quantize, quantize_params, "rewrite"),
              ("export", export, {"ane_lint": "warn"}, "quantize"))
    for stage, module, params, upstream in stages:
        dirs[stage] = root / stage
        dirs[stage].mkdir()
        module.run({upstream: dirs[upstream]}, params, dirs[stage])
    return {"convert": dirs["convert"], "export": dirs["export"]}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    done = {}

    def get(name):
        if name not in done:
            done[name] = build(tmp_path_factory.mktemp(name), name)
        return done[name]
    return get


def run_smoke(entries, out, **params):
    out.mkdir()
    try:
        smoke.run(entries, {**INTERPRETED, **params}, out)
    finally:
        report = json.loads((out / smoke.REPORT_JSON).read_text())
    return report


def twin_gates(report):
    """The strictest gates this report's twin meets: its worst top-1 agreement, its KL divergence."""
    summary = report["summary"]
    return {"min_top1_agreement": min(summary["min_top1_agreement"], summary["eval_top1_agreement"]),
            "max_mean_kld": summary["eval_mean_kld"]}


def test_smoke_reports_the_core_ml_program_beside_the_twin(builds, tmp_path):
    report = run_smoke(builds("fp32-c8w"), tmp_path / "smoke", max_mean_kld=1e-6)
    coreml, summary = report["coreml"], report["summary"]
    assert report["runtime"]["program"] == export.TWIN_FILE and report["coreml_not_run"] is None
    assert [r["prompt"] for r in coreml["prompts"]] == SMOKE["prompts"]
    assert [r["positions"] for r in coreml["prompts"]] == [SMOKE["n_steps"]] * 2
    assert coreml["eval_text"]["tokens"] == 64 and coreml["eval_text"]["positions"] == 63
    assert summary["coreml_min_top1_agreement"] == summary["coreml_eval_top1_agreement"] == 1.0
    assert summary["coreml_twin_min_top1_agreement"] == 1.0 and summary["coreml_eval_mean_kld"] < 1e-6
    assert [r["continuation_ids"] for r in report["prompts"]] == [r["program_ids"] for r in report["prompts"]]
    text = (tmp_path / "smoke" / smoke.REPORT_MD).read_text()
    assert "## The Core ML program" in text and "| prompt: the quick brown fox | 12 | 1.000 |" in text
    assert "| evaluation text, first 64 tokens | 63 | 1.000 |" in text


def test_interpreting_can_be_turned_off(builds, tmp_path):
    report = run_smoke(builds("fp32-c8w"), tmp_path / "smoke", interpret_coreml=False, coreml_eval_tokens=0)
    assert report["coreml"] is None and report["summary"]["coreml_min_top1_agreement"] is None
    assert "Not interpreted (smoke.interpret_coreml: false)" in (tmp_path / "smoke" / smoke.REPORT_MD).read_text()


def test_one_process_gives_the_same_report(builds, tmp_path, monkeypatch):
    """The interpreter runs in a second process beside the twin; with ANE_BUILD_JOBS=1, after it in this one."""
    beside = run_smoke(builds("fp32-c8w"), tmp_path / "beside", max_mean_kld=1e-6)
    monkeypatch.setenv("ANE_BUILD_JOBS", "1")
    later = run_smoke(builds("fp32-c8w"), tmp_path / "later", max_mean_kld=1e-6)
    for report in (beside, later):
        del report["coreml"]["seconds"]
    assert beside["coreml"] == later["coreml"]


DAMAGES = {
    "a weight's scales negated": ("fp32-c8w", lambda pte, out: coreml_damage.scales_changed(pte, out)),
    "a weight's scales doubled": ("fp16-c8w", lambda pte, out: coreml_damage.scales_changed(
        pte, out, which=3, change=lambda scale: 2 * scale)),
    # forward is the one-token decode, prefill the seq_length call (upstream's names).
    "transpose_y flipped in forward": ("fp16-c8w", lambda pte, out: coreml_damage.attribute_flipped(
        pte, out, "forward", "matmul", "transpose_y")),
    "transpose_y flipped in prefill": ("fp16-c8w", lambda pte, out: coreml_damage.attribute_flipped(
        pte, out, "prefill", "matmul", "transpose_y")),
    "the LM head's palettes reversed": ("fp16-lut4", lambda pte, out: coreml_damage.palettes_reversed(pte, out)),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_core_ml_payload_fails_smoke_by_name_while_the_twin_passes(builds, damage, tmp_path):
    name, damaged = DAMAGES[damage]
    entries = builds(name)
    gates = twin_gates(run_smoke(entries, tmp_path / "clean", **NO_GATES)) if name != "fp32-c8w" else \
        {"min_top1_agreement": 1.0, "max_mean_kld": 1e-6}
    copy = coreml_damage.copy_entry(entries["export"], tmp_path / "export")
    damaged(entries["export"] / export.MODEL_FILE, copy / export.MODEL_FILE)
    assert (copy / export.TWIN_FILE).read_bytes() == (entries["export"] / export.TWIN_FILE).read_bytes()
    with pytest.raises(UserError) as error:
        run_smoke({**entries, "export": copy}, tmp_path / "smoke", **gates)
    message = str(error.value)
    assert message.startswith("smoke.min_top1_agreement: model.pte (the Core ML program, interpreted), ")
    assert "\n" not in message
    report = json.loads((tmp_path / "smoke" / smoke.REPORT_JSON).read_text())
    summary = report["summary"]
    # The twin met the gates; the Core ML program parted from it.
    assert min(summary["min_top1_agreement"], summary["eval_top1_agreement"]) >= gates["min_top1_agreement"]
    assert summary["coreml_twin_min_top1_agreement"] < 1.0


def test_the_bundle_readme_says_what_the_core_ml_program_scored(builds, tmp_path):
    from ane_build.bundle import readme

    summary = run_smoke(builds("fp32-c8w"), tmp_path / "smoke", max_mean_kld=1e-6)["summary"]
    text = "\n".join(readme._quality(summary))
    assert "The Core ML program in `model.pte` itself, run by the smoke test on Linux through ane-build's " \
           "reference interpreter" in text
    assert "top-1 agreement with the fp32 checkpoint at least 1.000 on the smoke prompts; on the first 63 " \
           "positions of the same text, top-1 agreement 1.000 and mean KL divergence 0.0000" in text
    off = {**summary, **dict.fromkeys(summary_keys())}
    assert "The Core ML program itself was not run by this build's smoke test" in "\n".join(readme._quality(off))
    old = {k: v for k, v in summary.items() if not k.startswith("coreml_")}  # a manifest from before the check
    assert "Core ML program" not in "\n".join(readme._quality(old))


def summary_keys():
    from ane_build.analysis import coreml_quality

    return coreml_quality.SUMMARY_KEYS
