"""What each weight scheme keeps of SmolLM2-135M, at what size: one Pareto table, side by side.

    python benchmarks/quantization_quality.py [--schemes NAME ...] [--eval-tokens 4096] [--coreml-eval-tokens 512]

Each scheme is the default recipe (iPhone 15 Pro) with its ``quantize:`` section replaced (and
``ane.share_embedding`` off where it says so),
built through quantize and export by the pipeline itself (into the same store as ``doit``,
so convert and rewrite are shared and a scheme built before is reused), then scored by the
smoke stage's own code on the exported program (the CPU twin here, and the Core ML program
through the interpreter): top-1 agreement and mean KL divergence from the fp32 checkpoint on the
evaluation text, and the worst top-1 agreement of the recipe's prompts, with the quantize stage's
fitting time (the calibrate entry, shared by every calibrated scheme, is built once). The gates are off here, so a scheme that fails them is measured all
the same. ``model.pte`` is the Core ML program's size; "per-block scales" marks the schemes
the Neural Engine does not run as they are (../shared/research/ane_rules.md).

A scheme is on the Pareto front when no other is at most its size and at least as good on
both top-1 and KLD. The fp32 reference is the GGUF dequantized: a float checkpoint of the
same weights (SmolLM2 dequantized to fp32, as convert hands it on) gives every scheme the
same tensors to quantize, so the same numbers; only ``source`` needs the GGUF's blocks.
"""

import argparse
import copy
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ane_build import pipeline, recipe, schema
from ane_build.cache.store import Store
from ane_build.stages import smoke
from ane_build.util.errors import UserError

RECIPE = ROOT / "recipes" / "smollm2-135m" / "iphone15pro.yaml"
C8W = {"linear": "c8w", "mapping": "asymmetric"}
APART = {"share_embedding": False}  # the embedding table stored beside the LM head, as before
# name -> (recipe sections replacing the default's, per-block scales)
SCHEMES = {
    "c4w symmetric (the seed's)": ({"quantize": {"linear": "c4w"}, "ane": APART}, False),
    "c4w asym, LM head c8w, GPTQ": ({"quantize": {"linear": "c4w", "mapping": "asymmetric", "fit": "gptq",
                                                 "overrides": {"output": "c8w"}}}, False),
    "lut4 per channel, LM head c8w, Fisher k-means": (
        {"quantize": {"linear": "lut4", "palette_group": 1, "fit": "fisher", "overrides": {"output": "c8w"},
                      "mapping": "asymmetric"}}, False),
    "lut4 per channel, LM head c8w, Fisher k-means + GPTQ": (
        {"quantize": {"linear": "lut4", "palette_group": 1, "fit": "gptq", "overrides": {"output": "c8w"},
                      "mapping": "asymmetric"}}, False),
    "lut6 per 16 channels, LM head c8w, Fisher k-means + GPTQ": (
        {"quantize": {"linear": "lut6", "palette_group": 16, "fit": "gptq", "overrides": {"output": "c8w"},
                      "mapping": "asymmetric"}}, False),
    "budget 130 MB: c8w / lut6 / lut4 per 16, head c8w, Fisher + GPTQ": (
        {"quantize": {**C8W, "fit": "gptq", "budget_mb": 130, "overrides": {"output": "c8w"}}}, False),
    "budget 120 MB: c8w / lut6 per 16, head c8w, Fisher + GPTQ (the default)": (
        {"quantize": {**C8W, "fit": "gptq", "budget_mb": 120, "candidates": ["c8w", "lut6"],
                      "overrides": {"output": "c8w"}}}, False),
    "budget 120 MB: c8w / lut6 / lut4 per 16, head c8w, Fisher + GPTQ": (
        {"quantize": {**C8W, "fit": "gptq", "budget_mb": 120, "overrides": {"output": "c8w"}}}, False),
    "c8w asym, GPTQ": ({"quantize": {**C8W, "fit": "gptq"}}, False),
    "b4w/32 asymmetric": ({"quantize": {"linear": "b4w", "group_size": 32, "mapping": "asymmetric"}}, True),
    "source: the GGUF's Q4_1 / Q8_0 blocks": ({"quantize": {"linear": "source"}}, True),
    "c8w asym, round to nearest, embedding read from the LM head": ({"quantize": C8W}, False),
    "c8w asym, embedding 8,0 apart (the default before)": (
        {"quantize": {**C8W, "embedding": "8,0"}, "ane": APART}, False),
}
NO_GATES = {"min_top1_agreement": 0.0, "max_mean_kld": float("inf")}
BUILT = ("fetch", "convert", "calibrate", "rewrite", "quantize", "export")


def scheme_recipe(base, name, sections):
    """The default recipe with ``sections`` (quantize replaced, ane merged), named apart so that its
    store views are its own."""
    data = {k: v for k, v in recipe.recorded(base).items() if k in schema.SCHEMA and v is not None}
    data = {**data, "quantize": sections["quantize"], "ane": {**data["ane"], **sections.get("ane", {})}}
    data["calibrate"] = {k: v for k, v in data["calibrate"].items() if v is not None}
    resolved = recipe.validate(data, str(RECIPE))
    return {**copy.deepcopy(base), **resolved, "name": "quantization-quality/" + re.sub(r"\W+", "-", name)}


def measure(store, base, name, smoke_settings):
    """(model.pte bytes, smoke.json, quantize metrics) of the default recipe with scheme ``name``."""
    rec = scheme_recipe(base, name, SCHEMES[name][0])
    planned = pipeline.plan(rec, store.hasher)
    for stage in (s.name for s in pipeline.stages_of(rec) if s.name in BUILT):
        entry, _ = pipeline.build(store, rec, stage, planned)
    quantized = json.loads((store.entry("quantize", planned["quantize"][0]) / "manifest.json").read_text())
    params = {**rec["smoke"], "chat": rec["chat"], **NO_GATES, **smoke_settings}
    with tempfile.TemporaryDirectory() as out:
        inputs = {"export": entry, "convert": store.entry("convert", planned["convert"][0])}
        try:
            smoke.run(inputs, params, out)
        except UserError as e:  # a generation that loops: the report is written first
            print(f"  ({e})", file=sys.stderr)
        report = json.loads((Path(out) / smoke.REPORT_JSON).read_text())
    return (entry / "model.pte").stat().st_size, report, quantized


def pareto(rows):
    """Names of the rows no other of ``rows`` beats: at most its size, at least its top-1, at most its KLD."""
    def beaten(r):
        return any(o is not r and o["mb"] <= r["mb"] and o["top1"] >= r["top1"] and o["kld"] <= r["kld"]
                   and (o["mb"], o["top1"], o["kld"]) != (r["mb"], r["top1"], r["kld"]) for o in rows)
    return {r["name"] for r in rows if not beaten(r)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--coreml-eval-tokens", type=int, default=512,
                    help="tokens the interpreted Core ML program reads (~1 s per 64 here)")
    args = ap.parse_args()
    store = Store(Path(os.environ.get("ANE_BUILD_ARTIFACTS", ROOT / "artifacts")))  # as dodo.py reads it
    base = recipe.load(RECIPE, ROOT / "recipes")
    settings = {"eval_tokens": args.eval_tokens, "coreml_eval_tokens": args.coreml_eval_tokens}
    rows = []
    for name in args.schemes:
        print(f"{name} ...", file=sys.stderr, flush=True)
        size, report, quantized = measure(store, base, name, settings)
        rows.append(row(name, size, report, quantized))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows, base, args)


def row(name, size, report, quantized):
    evaluation, summary, metrics = report["eval_text"], report["summary"], quantized["metrics"]
    return {"name": name, "mb": size / 1e6, "top1": evaluation["top1_agreement"], "kld": evaluation["mean_kld"],
            "coreml_top1": summary["coreml_eval_top1_agreement"], "coreml_kld": summary["coreml_eval_mean_kld"],
            "prompts": summary["min_top1_agreement"], "per_block": SCHEMES[name][1],
            "fit_seconds": metrics.get("fit_seconds", 0.0), "ideal_mb": metrics["ideal_bytes"] / 1e6,
            "france": report["prompts"][-1]["text"]}


def print_table(rows, base, args):
    front = pareto(rows)
    # What the Neural Engine runs as it is: per-channel scales and palettes only.
    front_ne = pareto([r for r in rows if not r["per_block"]])
    print(f"Evaluation text: {args.eval_tokens} tokens of pydoc_data.topics, teacher-forced, on the CPU twin; "
          f"the Core ML program interpreted on the first {args.coreml_eval_tokens}.\n")
    print("| scheme | top-1 | mean KLD | Core ML top-1 | Core ML KLD | top-1 (prompts, worst) | model.pte MB | "
          "weights MB | fit s | NE-runnable | Pareto | Pareto, NE-runnable only | "
          f"after \"{base['smoke']['prompts'][-1]}\" |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["mb"]):
        text = " ".join(r["france"].split())[:50].replace("|", "\\|")
        print(f"| {r['name']} | {r['top1']:.3f} | {r['kld']:.4f} | {r['coreml_top1']:.3f} | {r['coreml_kld']:.4f} | "
              f"{r['prompts']:.3f} | {r['mb']:.1f} | {r['ideal_mb']:.1f} | {r['fit_seconds']:.0f} | "
              f"{'no' if r['per_block'] else 'yes'} | {'yes' if r['name'] in front else ''} | "
              f"{'yes' if r['name'] in front_ne else ''} | {text} |")


if __name__ == "__main__":
    main()
