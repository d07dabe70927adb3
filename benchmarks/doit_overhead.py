"""No-op `doit` on a built default recipe beside `doit list`, and the cold fetch+convert.

    python benchmarks/doit_overhead.py [--repeat 5] [--artifacts artifacts] [--base COMMIT]

Runs everything in one process tree, in a scratch artifacts folder (or, with
--artifacts, one that already holds the default build: no cold build then), and
prints a Markdown table (median wall seconds; peak RSS of the cold build). With
--base, also `doit list` of that commit (a git worktree) and of this tree in
turn, since listing plans every stage key as a no-op run does.
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


def doit(args, env, root=ROOT):
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "doit", "-f", str(root / "dodo.py"), *args],
                   env=env, check=True, capture_output=True, cwd=root)
    return time.perf_counter() - start


def median_of(repeat, args, env):
    return statistics.median(doit(args, env) for _ in range(repeat))


def listing_beside(base, repeat, scratch):
    """Median `doit list` of commit ``base`` and of this tree, run in turn."""
    tree = Path(scratch) / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), base], cwd=ROOT, check=True, capture_output=True)
    try:
        times = {"base": [], "head": []}
        for _ in range(repeat):
            for name, root in (("base", tree), ("head", ROOT)):
                env = {**os.environ, "ANE_BUILD_ARTIFACTS": str(Path(scratch) / f"list-{name}")}
                times[name].append(doit(["list"], env, root))
        return {name: statistics.median(t) for name, t in times.items()}
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--artifacts", type=Path, help="an artifacts folder holding the default build already")
    ap.add_argument("--base", help="a commit whose `doit list` to time beside this tree's")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "ANE_BUILD_ARTIFACTS": str((args.artifacts or Path(scratch)).resolve())}
        cold = doit([], env)  # the default task: the default recipe's last stage
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        noop = median_of(args.repeat, [], env)
        listing = median_of(args.repeat, ["list"], env)
        beside = listing_beside(args.base, args.repeat, scratch) if args.base else None
    print("| measurement | wall (s) |")
    print("|---|---|")
    print(f"| `doit list` (median of {args.repeat}) | {listing:.3f} |")
    print(f"| no-op `doit` on the built default recipe (median of {args.repeat}) | {noop:.3f} |")
    print(f"| no-op / list ratio | {noop / listing:.2f}x |")
    first = "first `doit` (already built: a no-op)" if args.artifacts else "cold `doit` (through release)"
    print(f"| {first} of {RECIPE} | {cold:.1f} (peak RSS {peak_mb:.0f} MB) |")
    if beside:
        print(f"| `doit list` at {args.base} / this tree, in turn (medians of {args.repeat}) | "
              f"{beside['base']:.3f} / {beside['head']:.3f} ({beside['head'] / beside['base']:.2f}x) |")


if __name__ == "__main__":
    main()
