"""A cold `doit` of the default recipe at one commit beside the same at an earlier one.

    python benchmarks/cold_build_vs_commit.py --base 4543d0b [--head HEAD] [--out DIR] [--repeat N]

Both commits are checked out into git worktrees under --out (so edits in this checkout while
it runs change nothing); each side builds the default recipe through release from an empty
artifacts folder of its own, in its own process tree, with its own code (``python -m doit``
run in its checkout imports that checkout's ``ane_build`` first). With --repeat N the two alternate N times, base first, and the medians
are reported with every run. Prints wall times, the ratio and each side's per-stage seconds
(from the store manifests).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_vs_seed import RECIPE, ROOT, timed

from ane_build import pipeline

# Every stage this checkout's pipeline has, in order (one a commit lacks shows 0.0).
PIPELINE = [stage.name for stage in pipeline.STAGES]


def build(checkout, artifacts, log):
    """(wall seconds, {stage: seconds}) of a cold default build of ``checkout`` into ``artifacts``
    (every stage the build ran: the calibrate stage too where the commit has one)."""
    if artifacts.exists():
        sys.exit(f"{artifacts}: already there, so the build would not be cold; give a new --out")
    wall, _, _ = timed([sys.executable, "-m", "doit"], log, env={"ANE_BUILD_ARTIFACTS": str(artifacts)},
                       cwd=checkout)
    views = artifacts / "recipes" / RECIPE
    return wall, {s.name: json.loads((s / "manifest.json").read_text())["seconds"] for s in views.iterdir()}


def worktree(path, commit):
    """A detached git worktree of ``commit`` at ``path`` (kept if there already, at that commit)."""
    rev = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, check=True, capture_output=True, text=True)
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True,
                       capture_output=True)
    there = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True, text=True)
    if there.stdout != rev.stdout:
        sys.exit(f"{path}: a worktree of {there.stdout.strip()[:12]}, not {commit}; give a new --out")
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="the commit to compare with")
    ap.add_argument("--head", default="HEAD", help="the commit to measure (default: HEAD)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="cold-vs-commit-")))
    ap.add_argument("--repeat", type=int, default=1, help="run both this many times, alternating")
    args = ap.parse_args()
    checkouts = {side: worktree(args.out / side, commit) for side, commit in (("base", args.base),
                                                                                ("head", args.head))}
    runs = {"base": [], "head": []}
    for i in range(args.repeat):
        for side, checkout in checkouts.items():
            runs[side].append(build(checkout, args.out / f"artifacts.{side}.{i}", args.out / f"{side}.{i}.log"))
        print(f"run {i + 1}: base {runs['base'][-1][0]:.1f} s, head {runs['head'][-1][0]:.1f} s", file=sys.stderr)
    walls = {side: statistics.median(w for w, _ in r) for side, r in runs.items()}
    median = f", median of {args.repeat}" if args.repeat > 1 else ""
    stages = [s for s in PIPELINE if any(s in seconds for r in runs.values() for _, seconds in r)]
    print(f"| | wall (s{median}) | " + " | ".join(stages) + " |")
    print("|---|---|" + "---|" * len(stages))
    for side, name in (("base", args.base), ("head", args.head)):
        times = [statistics.median(s.get(stage, 0.0) for _, s in runs[side]) for stage in stages]
        print(f"| {name} | {walls[side]:.1f} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print(f"\nratio ({args.head} / {args.base}): {walls['head'] / walls['base']:.2f}x")
    print("Runs, in order (base, head): " + "; ".join(f"{a[0]:.1f}, {b[0]:.1f}"
                                                     for a, b in zip(runs["base"], runs["head"])))


if __name__ == "__main__":
    main()
