"""Export of a Llama-3.2-1B-shaped checkpoint (random weights) with the Llama 3.2 1B recipe's settings.

    python benchmarks/export_llama32_1b_shape.py [--out DIR] [--recipe FILE] [--jobs 2 1]

dim 2048, 16 layers, 32 heads, 8 KV heads, hidden 8192, vocab 128256, rope theta
500000 with Llama 3 scaling, tied embeddings. The recipe (default
recipes/llama3.2-1b/iphone15pro.yaml) is turned into `python -m ane_build.cli.export` flags, so
the very stages a build runs (rewrite, quantize, export) run here on the random checkpoint (the
real one's license keeps it out of this repo). Prints, per lowering mode (ANE_BUILD_JOBS=2: the
twin lowered in a second process beside Core ML; 1: after it, in the same process): wall time,
peak RSS of the command's largest process (wait4) and the peak of its whole process tree's
anonymous memory (proportional set size, sampled from /proc: pages forked processes share
counted once, mapped files left out: TreeRss), which must fit a 16 GB CI runner; each Core ML payload's size (the program is cut between
layers under export.max_payload_mb); the Neural Engine lint; and a greedy decode of 16 tokens
through the CPU twin (the `forward` one-token method after a `prefill` call).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_vs_seed import ROOT, timed

PARAMS = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "head_dim": 64, "hidden_dim": 8192,
          "vocab_size": 128256, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
          "rope_scale_factor": 32.0, "high_freq_factor": 4.0}
RECIPE = ROOT / "recipes" / "llama3.2-1b" / "iphone15pro.yaml"
# Recipe fields the export command takes as flags of the same meaning (cli/export.py), and switches.
VALUED = {"ane": ("dtype", "seq_length", "max_seq_length", "cache_size", "target_split_size", "max_splits"),
          "quantize": ("group_size",), "export": ("minimum_deployment_target", "compute_unit", "max_payload_mb")}
SWITCHES = ("use_cache_list", "decode_method", "verify_method")
# Settings the command has no flag for: a recipe must leave them as the command's defaults.
FLAGLESS = {("ane", "share_embedding"): False, ("quantize", "overrides"): None, ("quantize", "budget_mb"): None,
            ("quantize", "mapping"): "symmetric", ("quantize", "scales"): "minmax", ("quantize", "fit"): "data-free"}
PROMPT = list(range(1000, 1040))  # 40 ids: a prefill call of 64 positions, then one-token decode calls


def write_checkpoint(folder):
    import torch
    from safetensors.torch import save_file

    from ane_build.checkpoint import canonical

    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in canonical.expected_shapes(PARAMS).items():
        if name == "output.weight":
            continue  # tied: the export reuses the embedding
        scale = 1.0 if name.endswith("norm.weight") else shape[-1] ** -0.5
        weights[name] = (torch.randn(shape, generator=gen) * scale).to(torch.float16)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "params.json").write_text(json.dumps(PARAMS))


def recipe_flags(path):
    """The export command's flags for the recipe at ``path``; exits naming a setting it cannot pass."""
    from ane_build import recipe

    rec = recipe.load(path)
    flags = []
    for section, keys in VALUED.items():
        flags += [item for key in keys if rec[section].get(key) is not None
                  for item in (f"--{key}", str(rec[section][key]))]
    flags += [f"--{key}" for key in SWITCHES if rec["ane"].get(key)]
    flags += ["--coreml-quantize", rec["quantize"]["linear"]]
    if rec["quantize"].get("embedding"):
        flags += ["-E", rec["quantize"]["embedding"]]
    for (section, key), default in FLAGLESS.items():
        if rec[section].get(key) != default:
            sys.exit(f"{path}: {section}.{key} has no flag of the export command; this benchmark cannot pass it")
    return flags


def payloads(pte):
    """[MB of each Core ML payload of ``pte``] and its lint summary (the lint the export wrote)."""
    from ane_build.programs import coreml_program

    sizes = [len(payload) / 1e6 for _, payload in coreml_program.coreml_payloads(pte)]
    lint = json.loads(pte.with_name(pte.stem + ".lint.json").read_text())
    weights = [m["weight_bytes"] / 1e6 for m in lint["models"]]
    return sizes, weights, lint


def twin_decode(twin):
    """(ids, prefill seconds, decode seconds per token, whether every step's logits were finite) of a
    greedy decode through ``twin``."""
    import torch

    from ane_build.runtime.generate import Generation
    from ane_build.runtime.program import PteProgram
    from ane_build.runtime.sampling import Sampler

    greedy, finite = Sampler(0.0), []

    def checked(logits):
        finite.append(bool(torch.isfinite(logits).all()))
        return greedy(logits)

    generation = Generation(PteProgram(twin), PROMPT, checked, n_steps=16)
    ids = list(generation)
    stats = generation.stats
    return ids, stats.prefill_seconds, stats.decode_seconds / max(stats.decode_calls, 1), all(finite)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="llama1b-bench-")))
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--jobs", nargs="+", default=["2", "1"], help="ANE_BUILD_JOBS values, one export each")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    flags = recipe_flags(args.recipe)
    print(f"{args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe}: {' '.join(flags)}")
    write_checkpoint(args.out)
    cmd = [sys.executable, "-m", "ane_build.cli.export", "-p", str(args.out / "params.json"),
           "-c", str(args.out / "model.safetensors"), "-n", str(args.out / "llama1b.pte"), *flags]
    print("| lowering | wall (s) | peak RSS, largest process (GB) | peak anonymous PSS, process tree (GB) | Core ML .pte (GB) "
          "| payloads (MB; weights MB) | lint findings (allowlisted) | twin .pte (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for jobs in args.jobs:
        wall, process_mb, tree_mb = timed(cmd, args.out / f"export{jobs}.log", {"ANE_BUILD_JOBS": jobs}, pss=True)
        pte = args.out / "llama1b.pte"
        sizes, weights, lint = payloads(pte)
        shown = ", ".join(f"{s:.1f} ({w:.1f})" for s, w in zip(sizes, weights))
        print(f"| ANE_BUILD_JOBS={jobs} | {wall:.0f} | {process_mb / 1024:.2f} | {tree_mb / 1024:.2f} | "
              f"{pte.stat().st_size / 2**30:.2f} | {shown} | {lint['findings']} ({lint['allowlisted']}) | "
              f"{pte.with_suffix('.twin.pte').stat().st_size / 2**30:.2f} |", flush=True)
    started = time.perf_counter()
    ids, prefill_s, decode_s, finite = twin_decode(args.out / "llama1b.twin.pte")
    print(f"\ntwin decode ({time.perf_counter() - started:.0f} s with loading): prompt of {len(PROMPT)} ids, "
          f"prefill {prefill_s:.2f} s, {decode_s * 1000:.0f} ms per decoded token, logits finite: {finite}; "
          f"greedy ids {ids}")


if __name__ == "__main__":
    main()
