"""Export of the default model: ours (`python -m ane_build.export`) beside the seed's export.py.

    python benchmarks/export_vs_seed.py [--checkpoint DIR] [--out DIR]

Both get the same checkpoint (a .pth written from the default recipe's canonical
checkpoint) and the iPhone 15 Pro settings; each runs in its own process, timed
with its own peak RSS (wait4). Ours also lowers the CPU twin. Prints a Markdown
table with the ratios, and the .pte sizes against the ideal size.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2-135m/iphone15pro"
SETTINGS = ["--seq_length", "64", "--max_seq_length", "1024", "--use_cache_list",
            "--target_split_size", "1024", "--max_splits", "8", "--coreml-quantize", "c4w", "--dtype", "fp16"]


def timed(cmd, log):
    """(wall seconds, peak RSS in MB) of one process."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd[2]} failed; see {log}")
    return wall, usage.ru_maxrss / 1024


def canonical_checkpoint():
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), f"convert:{RECIPE}"],
                   check=True, capture_output=True, cwd=ROOT)
    return (ROOT / "artifacts/recipes" / RECIPE / "convert").resolve()


def write_pth(ckpt, out):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(ckpt / "model.safetensors")), out / "model.pth")
    (out / "params.json").write_text((ckpt / "params.json").read_text())


def ideal_bytes(params):
    """Parameters x bits / 8 per tensor group: 4-bit linears (LM head included), fp16 embedding and norms."""
    dim, hidden, vocab, layers = params["dim"], params["hidden_dim"], params["vocab_size"], params["n_layers"]
    hd, heads, kv = params["head_dim"], params["n_heads"], params["n_kv_heads"]
    linear = layers * (dim * hd * (2 * heads + 2 * kv) + 3 * dim * hidden) + vocab * dim
    fp16 = vocab * dim + (2 * layers + 1) * dim
    return {"linear (4-bit)": linear * 4 // 8, "embedding + norms (fp16)": fp16 * 2}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, help="canonical checkpoint (default: build the default recipe's)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="export-bench-")))
    args = ap.parse_args()
    ckpt = args.checkpoint or canonical_checkpoint()
    args.out.mkdir(parents=True, exist_ok=True)
    write_pth(ckpt, args.out)
    files = ["-p", str(args.out / "params.json"), "-c", str(args.out / "model.pth")]
    seed = timed([sys.executable, "-m", "executorch.examples.apple.coreml.llama.export",
                  "-n", str(args.out / "seed.pte"), *files, *SETTINGS], args.out / "seed.log")
    ours = timed([sys.executable, "-m", "ane_build.export", "-n", str(args.out / "ours.pte"), *files, *SETTINGS],
                 args.out / "ours.log")
    ideal = ideal_bytes(json.loads((ckpt / "params.json").read_text()))
    sizes = {name: (args.out / f"{name}.pte").stat().st_size for name in ("seed", "ours")}
    print("| | seed export.py | ane-build export | ratio (ours / seed) |")
    print("|---|---|---|---|")
    print(f"| wall (s) | {seed[0]:.1f} | {ours[0]:.1f} | {ours[0] / seed[0]:.2f}x |")
    print(f"| peak RSS (MB) | {seed[1]:.0f} | {ours[1]:.0f} | {ours[1] / seed[1]:.2f}x |")
    print(f"| Core ML .pte (MB) | {sizes['seed'] / 1e6:.1f} | {sizes['ours'] / 1e6:.1f} | "
          f"{sizes['ours'] / sizes['seed']:.3f}x |")
    total = sum(ideal.values())
    print(f"\nIdeal size {total / 1e6:.1f} MB (" + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in ideal.items())
          + f"); ours is {sizes['ours'] / total:.3f}x the ideal, the seed's {sizes['seed'] / total:.3f}x.")


if __name__ == "__main__":
    main()
