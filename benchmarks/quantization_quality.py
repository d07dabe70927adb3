"""How much of the fp32 model's greedy choice each 4-bit linear setting keeps, on the default model.

    python benchmarks/quantization_quality.py [--steps 48]

The default recipe's converted checkpoint runs in the fp32 reference model twice per setting:
once with its own weights, once with every linear weight (LM head included, as c4w does)
quantized by the quantize stage's own torchao code and dequantized back. Score: top-1
agreement over ``--steps`` teacher-forced positions of the fp32 model's greedy continuation,
per prompt; plus the quantized model's own greedy text for one prompt, to read.
This isolates the quantization's loss from fp16 and from the export (the smoke stage measures
the exported program end to end).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_vs_seed import recipe_view

from ane_build.model.reference import ReferenceLlama
from ane_build.runtime.tokenizer import Tokenizer
from ane_build.stages import quantize

PROMPTS = ["Once upon a time,", "The capital of France is", "Water boils at", "def fibonacci(n):",
           "My favourite food is", "The best way to learn a language is"]
SETTINGS = {
    "c4w symmetric (the seed's)": {"linear": "c4w", "mapping": "symmetric"},
    "c4w asymmetric": {"linear": "c4w", "mapping": "asymmetric"},
    "b4w/32 symmetric": {"linear": "b4w", "group_size": 32, "mapping": "symmetric"},
    "b4w/32 asymmetric": {"linear": "b4w", "group_size": 32, "mapping": "asymmetric"},
}


def quantized_weights(weights, params):
    """``weights`` with every linear weight quantized as the quantize stage does, then dequantized."""
    names = [k for k in weights if k == "output.weight" or ".attention.w" in k or ".feed_forward.w" in k]
    linears = nn.ModuleList()
    for name in names:
        linear = nn.Linear(weights[name].shape[1], weights[name].shape[0], bias=False)
        linear.weight = nn.Parameter(weights[name].half(), requires_grad=False)  # the rewrite's fp16
        linears.append(linear)
    quantize._quantize(linears, quantize.resolve(params))
    return {**weights, **{n: m.weight.dequantize().float() for n, m in zip(names, linears)}}


def agreement(model, cases):
    scores = []
    for ids, continuation in cases:
        logits = model(torch.tensor([ids + continuation[:-1]]))[0, len(ids) - 1:]
        scores.append((logits.argmax(-1) == torch.tensor(continuation)).float().mean().item())
    return scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args()
    convert = recipe_view("convert")
    model = ReferenceLlama.from_checkpoint(convert)
    tokenizer = Tokenizer(convert / "tokenizer.json")
    weights = dict(model.w)
    cases = [(ids, model.greedy(ids, args.steps)) for ids in map(tokenizer.encode, PROMPTS)]
    shown = cases[1][0]
    print(f"Top-1 agreement with fp32 over {args.steps} teacher-forced positions per prompt.\n")
    print("| linear weights | mean | worst | " + " | ".join(PROMPTS) + f" | greedy after {PROMPTS[1]!r} |")
    print("|---" * (len(PROMPTS) + 4) + "|")
    for name, params in {"fp32 (itself)": None, **SETTINGS}.items():
        model.w = quantized_weights(weights, params) if params else weights
        scores = agreement(model, cases)
        text = " ".join(tokenizer.decode(model.greedy(shown, 24)).split()).replace("|", "\\|")
        print(f"| {name} | {sum(scores) / len(scores):.3f} | {min(scores):.3f} | "
              + " | ".join(f"{s:.2f}" for s in scores) + f" | {text} |")


if __name__ == "__main__":
    main()
