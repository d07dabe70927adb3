"""A cold `doit` of the default recipe through release, beside the seed's export.py alone.

    python benchmarks/cold_build_vs_seed.py [--out DIR] [--repeat N]

Ours: `doit` (the default task) on an empty scratch artifacts folder: fetch, convert,
rewrite, quantize, export (Core ML forward + decode, and the CPU twin), smoke, release.
Seed: `python -m executorch.examples.apple.coreml.llama.export` with the iPhone 15 Pro
settings on a .pth of the same checkpoint (written beforehand, not timed). Each runs in its
own process tree; prints wall times, peak RSS and the ratio, and our per-stage seconds. With
--repeat N the two alternate N times (ours from an empty artifacts folder each time) and the
medians are reported, with every run.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_vs_seed import (
    ROOT,
    SEED_COMMAND,
    SETTINGS,
    canonical_checkpoint,
    recipe_view,
    timed,
    write_pth,
)

STAGES = ("fetch", "convert", "rewrite", "quantize", "export", "smoke", "release")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="cold-bench-")))
    ap.add_argument("--repeat", type=int, default=1, help="run both this many times, alternating")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_pth(canonical_checkpoint(), args.out)
    seed_runs, our_runs, stage_runs = [], [], []
    for i in range(args.repeat):
        seed_runs.append(timed([*SEED_COMMAND, "-n", str(args.out / "seed.pte"), "-p", str(args.out / "params.json"),
                                "-c", str(args.out / "model.pth"), *SETTINGS], args.out / f"seed.{i}.log"))
        os.environ["ANE_BUILD_ARTIFACTS"] = str(args.out / f"artifacts.{i}")  # dodo.py reads it; the child inherits it
        our_runs.append(timed([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py")], args.out / f"doit.{i}.log"))
        stage_runs.append({s: json.loads((recipe_view(s) / "manifest.json").read_text())["seconds"] for s in STAGES})
        print(f"run {i + 1}: seed {seed_runs[-1][0]:.1f} s, ours {our_runs[-1][0]:.1f} s", file=sys.stderr)
    seed, ours = ([statistics.median(r[k] for r in runs) for k in range(3)] for runs in (seed_runs, our_runs))
    seconds = {s: statistics.median(r[s] for r in stage_runs) for s in STAGES}
    median = f", median of {args.repeat}" if args.repeat > 1 else ""
    print(f"| | wall (s{median}) | peak RSS, process tree (MB{median}) |")
    print("|---|---|---|")
    print(f"| seed export.py (export only) | {seed[0]:.1f} | {seed[2]:.0f} |")
    print(f"| cold `doit` through release | {ours[0]:.1f} | {ours[2]:.0f} |")
    print(f"| ratio (ours / seed) | {ours[0] / seed[0]:.2f}x | {ours[2] / seed[2]:.2f}x |")
    print("\nOur stages (s): " + ", ".join(f"{s} {t:.1f}" for s, t in seconds.items())
          + f"; doit and imports the rest ({ours[0] - sum(seconds.values()):.1f}).")
    print("Runs, in order (seed, ours): " + "; ".join(f"{a[0]:.1f}, {b[0]:.1f}" for a, b in zip(seed_runs, our_runs)))


if __name__ == "__main__":
    main()
