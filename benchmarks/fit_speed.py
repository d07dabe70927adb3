"""The quantize stage's calibrated fits of the default recipe, timed against an older copy of the code.

    python benchmarks/fit_speed.py [--old DIR] [--layer 10] [--all] [--repeat N]
                                   [--rewrite DIR] [--calibrate DIR]

Fits (``calibrated.fit``, on one torch thread as ``mixed.fit_all`` runs it) the default recipe's
(iPhone 15 Pro) linears at each of their kinds with its settings: by default layer ``--layer``'s
seven linears at every candidate kind and one chunk of the LM head at its override's; ``--all``:
every (linear, kind) the stage fits. Inputs: the rewrite entry's weights and the calibrate entry's
statistics (built by ``doit`` beforehand). With ``--old DIR``, a folder holding older copies of
``ane_build/quant``'s calibrated.py, gptq.py and sensitive_kmeans.py (copied there before a
change), each fit runs with both, side by side in this process (old first, then new, ``--repeat``
times each, the fastest kept), and the two must give the same ``Fitted``: every code, table, scale
and zero point ``torch.equal``, the same bytes and estimate. Prints a Markdown table (seconds per
fit, old / new, whether identical) and the totals; exits 1 if any fit differs.
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ane_build import recipe
from ane_build.model import io
from ane_build.quant import calibrated, calibration, mixed
from ane_build.stages import quantize

RECIPE = ROOT / "recipes" / "smollm2-135m" / "iphone15pro.yaml"
REWRITE = ROOT / "artifacts" / "recipes" / "smollm2-135m" / "iphone15pro" / "rewrite"
CALIBRATE = REWRITE.parent / "calibrate"
LAYER_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
HEAD_CHUNK = "output.chunks.3"


def old_calibrated(folder):
    """``calibrated`` as the copies in ``folder`` have it, calling their gptq and sensitive_kmeans."""
    modules = {name: _load(Path(folder) / f"{name}.py", f"fit_speed_old_{name}")
               for name in ("gptq", "sensitive_kmeans", "calibrated")}
    modules["calibrated"].gptq, modules["calibrated"].sensitive_kmeans = modules["gptq"], modules["sensitive_kmeans"]
    return modules["calibrated"]


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its classes pickle by their module's name
    spec.loader.exec_module(module)
    return module


def jobs(model, settings, layer, every):
    """(linear name, kind) pairs as the stage fits them: overridden linears at their kind, the others
    at every candidate; all of them (``every``) or layer ``layer``'s and the LM head's ``HEAD_CHUNK``."""
    names = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not every:
        names = [f"layers.{layer}.{linear}" for linear in LAYER_LINEARS] + [HEAD_CHUNK]
    return [(name, kind) for name in names for kind in _kinds(settings, name)]


def _kinds(settings, name):
    overridden = quantize._override(settings, name)
    return [overridden] if overridden else settings["candidates"]


def warm_up(job, linears, stats, settings, modules):
    """One untimed fit of ``job`` with each module: the first pays for torchao's import."""
    name, kind = job
    fisher, xtx = calibrated.rows_of(stats, name, linears[name].out_features)
    for module in modules:
        timed_fit(module, linears[name], fisher, xtx, kind, settings, 1)


def timed_fit(module, linear, fisher, xtx, kind, settings, repeat):
    """(the fastest of ``repeat`` runs in seconds, the ``Fitted``) of ``module.fit``."""
    best = None
    for _ in range(repeat):
        started = time.perf_counter()
        fitted = module.fit(linear.weight, fisher, xtx, kind, settings["fit"], settings["palette_group"],
                            settings["mapping"] == "symmetric")
        seconds = time.perf_counter() - started
        best = seconds if best is None else min(best, seconds)
    return best, fitted


def identical(a, b):
    same_codes = len(a.codes) == len(b.codes) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a.codes, b.codes))
    return same_codes and (a.kind, a.bytes, a.estimated_kld) == (b.kind, b.bytes, b.estimated_kld)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=Path, help="folder with the old calibrated.py, gptq.py, sensitive_kmeans.py")
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--all", action="store_true", help="every (linear, kind) the stage fits")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--rewrite", type=Path, default=REWRITE)
    ap.add_argument("--calibrate", type=Path, default=CALIBRATE)
    args = ap.parse_args()
    settings = quantize.resolve(recipe.load(RECIPE, ROOT / "recipes")["quantize"])
    model = io.load_model(args.rewrite)
    stats = calibration.load(args.calibrate / calibration.FILE)
    old = old_calibrated(args.old) if args.old else None
    linears = dict(model.named_modules())
    totals, differ = {"old": 0.0, "new": 0.0}, 0
    print("| linear | kind | old (s) | new (s) | old / new | identical |")
    print("|---|---|---|---|---|---|")
    with mixed.threads(1):
        todo = jobs(model, settings, args.layer, args.all)
        warm_up(todo[0], linears, stats, settings, [m for m in (old, calibrated) if m])
        for name, kind in todo:
            fisher, xtx = calibrated.rows_of(stats, name, linears[name].out_features)
            inputs = (linears[name], fisher, xtx, kind, settings, args.repeat)
            before, old_fitted = timed_fit(old, *inputs) if old else (None, None)
            after, fitted = timed_fit(calibrated, *inputs)
            totals["new"] += after
            if old is None:
                print(f"| {name} | {kind} | | {after:.3f} | | |", flush=True)
                continue
            totals["old"] += before
            same = identical(old_fitted, fitted)
            differ += not same
            print(f"| {name} | {kind} | {before:.3f} | {after:.3f} | {before / after:.2f}x | {same} |", flush=True)
    ratio = f" | {totals['old'] / totals['new']:.2f}x | {differ} differ" if old else ""
    print(f"| total | | {totals['old']:.3f} | {totals['new']:.3f}{ratio} |")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
