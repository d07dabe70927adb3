"""What each weight scheme keeps of SmolLM2-135M, at what size: one Pareto table, side by side.

    python benchmarks/quantization_quality.py [--schemes NAME ...] [--eval-tokens 512]

Each scheme is the default recipe (iPhone 15 Pro) with its ``quantize:`` section replaced,
built through quantize and export by the pipeline itself (into the same store as ``doit``,
so convert and rewrite are shared and a scheme built before is reused), then scored by the
smoke stage's own code on the exported program (the CPU twin here): top-1 agreement and mean
KL divergence from the fp32 checkpoint on the evaluation text, and the worst top-1 agreement
of the recipe's prompts. The gates are off here, so a scheme that fails them is measured all
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
# name -> (quantize section, per-block scales)
SCHEMES = {
    "c4w symmetric (the seed's)": ({"linear": "c4w", "mapping": "symmetric"}, False),
    "c4w asymmetric": ({"linear": "c4w", "mapping": "asymmetric"}, False),
    "c4w hqq scales": ({"linear": "c4w", "scales": "hqq"}, False),
    "c4w asym, LM head + first/last layer c8w": (
        {"linear": "c4w", "mapping": "asymmetric",
         "overrides": {"output": "c8w", "layers.0": "c8w", "layers.29": "c8w"}}, False),
    "b4w/32 asymmetric": ({"linear": "b4w", "group_size": 32, "mapping": "asymmetric"}, True),
    "c8w symmetric": ({"linear": "c8w", "mapping": "symmetric"}, False),
    "c8w asymmetric": ({"linear": "c8w", "mapping": "asymmetric"}, False),
    "c8w asymmetric, embedding 8,0 (the default)": (
        {"linear": "c8w", "mapping": "asymmetric", "embedding": "8,0"}, False),
    "source: the GGUF's Q4_1 / Q8_0 blocks": ({"linear": "source"}, True),
}
NO_GATES = {"min_top1_agreement": 0.0, "max_mean_kld": float("inf")}


def scheme_recipe(base, name, quantize):
    """The default recipe with ``quantize``, named apart so that its store views are its own."""
    data = {k: v for k, v in recipe.recorded(base).items() if k in schema.SCHEMA and v is not None}
    quantize = recipe.validate({**data, "quantize": quantize}, str(RECIPE))["quantize"]
    return {**copy.deepcopy(base), "quantize": quantize, "name": "quantization-quality/" + re.sub(r"\W+", "-", name)}


def measure(store, base, name, eval_tokens):
    """(model.pte bytes, smoke.json) of the default recipe with scheme ``name``'s quantization."""
    rec = scheme_recipe(base, name, SCHEMES[name][0])
    planned = pipeline.plan(rec, store.hasher)
    for stage in ("fetch", "convert", "rewrite", "quantize", "export"):
        entry, _ = pipeline.build(store, rec, stage, planned)
    params = {**rec["smoke"], "chat": rec["chat"], **NO_GATES, "eval_tokens": eval_tokens}
    with tempfile.TemporaryDirectory() as out:
        inputs = {"export": entry, "convert": store.entry("convert", planned["convert"][0])}
        try:
            smoke.run(inputs, params, out)
        except UserError as e:  # a generation that loops: the report is written first
            print(f"  ({e})", file=sys.stderr)
        report = json.loads((Path(out) / smoke.REPORT_JSON).read_text())
    return (entry / "model.pte").stat().st_size, report


def pareto(rows):
    """Names of the rows no other of ``rows`` beats: at most its size, at least its top-1, at most its KLD."""
    def beaten(r):
        return any(o is not r and o["mb"] <= r["mb"] and o["top1"] >= r["top1"] and o["kld"] <= r["kld"]
                   and (o["mb"], o["top1"], o["kld"]) != (r["mb"], r["top1"], r["kld"]) for o in rows)
    return {r["name"] for r in rows if not beaten(r)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--eval-tokens", type=int, default=512)
    args = ap.parse_args()
    store = Store(Path(os.environ.get("ANE_BUILD_ARTIFACTS", ROOT / "artifacts")))  # as dodo.py reads it
    base = recipe.load(RECIPE, ROOT / "recipes")
    rows = []
    for name in args.schemes:
        print(f"{name} ...", file=sys.stderr, flush=True)
        size, report = measure(store, base, name, args.eval_tokens)
        evaluation = report["eval_text"]
        rows.append({"name": name, "mb": size / 1e6, "top1": evaluation["top1_agreement"],
                     "kld": evaluation["mean_kld"], "prompts": report["summary"]["min_top1_agreement"],
                     "per_block": SCHEMES[name][1], "france": report["prompts"][-1]["text"]})
    front = pareto(rows)
    # What the Neural Engine runs as it is: per-channel scales and palettes only.
    front_ne = pareto([r for r in rows if not r["per_block"]])
    print(f"Evaluation text: {args.eval_tokens} tokens of pydoc_data.topics['naming'], teacher-forced;"
          " the program is the CPU twin.\n")
    print("| scheme | top-1 (eval) | mean KLD (eval) | top-1 (prompts, worst) | model.pte MB | per-block scales "
          f"| Pareto | Pareto, NE-runnable only | after \"{base['smoke']['prompts'][-1]}\" |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["mb"]):
        text = " ".join(r["france"].split())[:60].replace("|", "\\|")
        print(f"| {r['name']} | {r['top1']:.3f} | {r['kld']:.5f} | {r['prompts']:.3f} | {r['mb']:.1f} | "
              f"{'yes' if r['per_block'] else 'no'} | {'yes' if r['name'] in front else ''} | "
              f"{'yes' if r['name'] in front_ne else ''} | {text} |")


if __name__ == "__main__":
    main()
