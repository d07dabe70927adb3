"""No-op `doit` on a built default recipe beside `doit list`, and the cold fetch+convert.

    python benchmarks/doit_overhead.py [--repeat 5]

Runs everything in one process tree, in a scratch artifacts folder, and prints
a Markdown table (median wall seconds; peak RSS of the cold build).
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2-135m/iphone15pro"  # dodo.py's default recipe


def doit(args, env):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args],
                   env=env, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def median_of(repeat, args, env):
    return statistics.median(doit(args, env) for _ in range(repeat))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "ANE_BUILD_ARTIFACTS": scratch}
        cold = doit([], env)  # the default task: the default recipe's last stage
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        noop = median_of(args.repeat, [], env)
        listing = median_of(args.repeat, ["list"], env)
    print("| measurement | wall (s) |")
    print("|---|---|")
    print(f"| `doit list` (median of {args.repeat}) | {listing:.3f} |")
    print(f"| no-op `doit` on the built default recipe (median of {args.repeat}) | {noop:.3f} |")
    print(f"| no-op / list ratio | {noop / listing:.2f}x |")
    print(f"| cold `doit` (fetch+convert) of {RECIPE} | {cold:.1f} (peak RSS {peak_mb:.0f} MB) |")


if __name__ == "__main__":
    main()
