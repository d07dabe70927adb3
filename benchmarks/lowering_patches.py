"""Each patch of ``programs/lowering.py`` on and off, on the default recipe's export stage.

    python benchmarks/lowering_patches.py [--artifacts artifacts] [--only NAME ...]

Runs the export stage (Core ML and the CPU twin, as a build does) on the default recipe's
built quantize entry, once with every patch (the baseline), then once with each patch left
out (``ANE_BUILD_LOWERING_WITHOUT=<name>``), then the baseline again, each in a process of
its own. Reports wall time and the peak RSS summed over the process tree (the twin lowers in
a second process), each against the mean of the two baselines, and whether the programs are
byte-identical to the baseline's. A patch pays when leaving it out costs at least 5% of the
stage's time or memory.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_vs_seed import TreeRss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2-135m/iphone15pro"
STAGE = ("import json, sys; from pathlib import Path; from ane_build.stages import export; "
         "export.run({'quantize': Path(sys.argv[1])}, json.loads(sys.argv[2]), Path(sys.argv[3]))")


def export_params():
    from ane_build import pipeline, recipe

    rec = recipe.load(ROOT / "recipes" / f"{RECIPE}.yaml", ROOT / "recipes")
    return pipeline.run_params(pipeline.BY_NAME["export"], rec)


def run_stage(quantize_entry, params, without, out):
    out.mkdir()
    env = {**os.environ, "ANE_BUILD_LOWERING_WITHOUT": without or ""}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", STAGE, str(quantize_entry), json.dumps(params), str(out)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rss = TreeRss(proc.pid)
    if proc.wait():
        raise SystemExit(f"the export stage failed without {without}")
    peak_mb = rss.stop()
    digests = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in ("model.pte", "twin.pte")}
    return time.perf_counter() - start, peak_mb, digests


def main():
    from ane_build.programs import lowering

    ap = argparse.ArgumentParser()
    ap.add_argument("--artifacts", type=Path, default=ROOT / "artifacts")
    ap.add_argument("--only", nargs="*", help="patch names to leave out (default: each in turn)")
    args = ap.parse_args()
    entry = (args.artifacts / "recipes" / RECIPE / "quantize").resolve()
    params = export_params()
    names = args.only or list(lowering.PATCHES)
    with tempfile.TemporaryDirectory() as scratch:
        runs = [(name, *run_stage(entry, params, name, Path(scratch) / f"{i}-{name or 'all'}"))
                for i, name in enumerate([None, *names, None])]
    baselines = [r for r in runs if r[0] is None]
    wall = sum(r[1] for r in baselines) / 2
    peak = sum(r[2] for r in baselines) / 2
    print(f"Baseline (every patch): {baselines[0][1]:.1f} s / {baselines[1][1]:.1f} s, "
          f"{baselines[0][2]:.0f} MB / {baselines[1][2]:.0f} MB peak (process tree)\n")
    print("| left out | wall (s) | x baseline | peak tree RSS (MB) | x baseline | same programs |")
    print("|---|---|---|---|---|---|")
    for name, seconds, mb, digests in runs:
        if name is not None:
            same = "yes" if digests == baselines[0][3] else "NO"
            print(f"| {name} | {seconds:.1f} | {seconds / wall:.2f}x | {mb:.0f} | {mb / peak:.2f}x | {same} |")


if __name__ == "__main__":
    main()
