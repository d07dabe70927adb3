"""A cold `doit` of the default recipe through release, beside the seed's export.py alone.

    python benchmarks/cold_build_vs_seed.py [--out DIR]

Ours: `doit` (the default task) on an empty scratch artifacts folder: fetch, convert,
rewrite, quantize, export (Core ML forward + decode, and the CPU twin), smoke, release.
Seed: `python -m executorch.examples.apple.coreml.llama.export` with the iPhone 15 Pro
settings on a .pth of the same checkpoint (written beforehand, not timed). Each runs in its
own process tree; prints wall times, peak RSS and the ratio, and our per-stage seconds.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_vs_seed import ROOT, SEED_COMMAND, SETTINGS, canonical_checkpoint, recipe_view, timed, write_pth

STAGES = ("fetch", "convert", "rewrite", "quantize", "export", "smoke", "release")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="cold-bench-")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_pth(canonical_checkpoint(), args.out)
    seed = timed([*SEED_COMMAND, "-n", str(args.out / "seed.pte"), "-p", str(args.out / "params.json"),
                  "-c", str(args.out / "model.pth"), *SETTINGS], args.out / "seed.log")
    artifacts = args.out / "artifacts"
    os.environ["ANE_BUILD_ARTIFACTS"] = str(artifacts)  # dodo.py reads it; the child inherits it
    ours = timed([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py")], args.out / "doit.log")
    seconds = {s: json.loads((recipe_view(s) / "manifest.json").read_text())["seconds"] for s in STAGES}
    print("| | wall (s) | peak RSS, process tree (MB) |")
    print("|---|---|---|")
    print(f"| seed export.py (export only) | {seed[0]:.1f} | {seed[2]:.0f} |")
    print(f"| cold `doit` through release | {ours[0]:.1f} | {ours[2]:.0f} |")
    print(f"| ratio (ours / seed) | {ours[0] / seed[0]:.2f}x | {ours[2] / seed[2]:.2f}x |")
    print("\nOur stages (s): " + ", ".join(f"{s} {t:.1f}" for s, t in seconds.items())
          + f"; doit and imports the rest ({ours[0] - sum(seconds.values()):.1f}).")


if __name__ == "__main__":
    main()
