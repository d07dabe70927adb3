"""The calibrated fits of a model's linears, and the mixed-precision choice among them.

``fit_all`` fits (linear, kind) pairs with ``calibrated.fit``, in this process and a forked copy of
it at once; ``allocation`` picks each free linear's kind within the recipe's ``budget_mb``
(``allocate``) and writes down why (``allocation.json``).
"""

import contextlib
import multiprocessing

import torch

from ane_build.quant import allocate, calibrated
from ane_build.util import worker
from ane_build.util.errors import UserError


def fit_all(jobs, modules, settings, stats):
    """The ``calibrated.Fitted`` of each (linear name, kind) of ``jobs``, in order: a forked copy of this
    process fits them meanwhile, each side taking the next job not yet taken, on one thread (a fit is a
    few small matrix products and sorts at a time, which two threads share badly). Taken as they come,
    not every other one: a budget's jobs alternate kinds, and the side given every palette (a fit
    costing twice a grid's) had twice the work."""
    taken = multiprocessing.get_context("fork").Value("i", 0)  # how many jobs either side has taken
    run_beside = worker.beside_or_later(start="fork")
    with run_beside(_fit_some, jobs, modules, settings, stats, taken, True) as beside, threads(1):
        done = _fit_some(jobs, modules, settings, stats, taken)
        done.update((i, calibrated.Fitted.from_numpy(f)) for i, f in beside().items())
    return [done[i] for i in range(len(jobs))]


def _fit_some(jobs, modules, settings, stats, taken, as_numpy=False):
    """{index: fit} of the jobs this side takes (``_take``) until none is left; ``as_numpy``: their codes
    as numpy arrays, which cross processes as bytes (torch's tensors would go as shared memory, gone
    with the process that made them)."""
    done = {}
    while (i := _take(taken)) < len(jobs):
        name, kind = jobs[i]
        linear = modules[name]
        fisher, xtx = calibrated.rows_of(stats, name, linear.out_features)
        fitted = calibrated.fit(linear.weight, fisher, xtx, kind, settings["fit"], settings["palette_group"],
                                settings["mapping"] == "symmetric")
        done[i] = fitted.to_numpy() if as_numpy else fitted
    return done


def _take(taken):
    """The index of the next job, counted in ``taken`` (shared by both sides)."""
    with taken.get_lock():
        taken.value += 1
        return taken.value - 1


@contextlib.contextmanager
def threads(n):
    """torch on ``n`` threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def allocation(options, fixed, settings):
    """({linear: chosen Fitted}, allocation.json) for ``options`` {linear: [Fitted per candidate]} within
    ``settings["budget_mb"]``, ``fixed`` bytes of the weights being no linear's to choose."""
    chosen = allocate.allocate(options, settings["budget_mb"] * 1e6 - fixed)
    if chosen is None:
        smallest = (fixed + sum(min(o.bytes for o in opts) for opts in options.values())) / 1e6
        raise UserError("", f"quantize.budget_mb={settings['budget_mb']}: the weights take at least {smallest:.1f} "
                            f"MB with the smallest of {', '.join(settings['candidates'])} in every linear")
    return chosen, {
        "budget_mb": settings["budget_mb"], "fit": settings["fit"], "fixed_mb": round(fixed / 1e6, 3),
        "weights_mb": round((fixed + sum(f.bytes for f in chosen.values())) / 1e6, 3),
        "estimated_kld": sum(f.estimated_kld for f in chosen.values()),
        "kinds": {kind: sum(f.kind == kind for f in chosen.values()) for kind in settings["candidates"]},
        "layers": {name: {"kind": f.kind, **{o.kind: {"bytes": o.bytes, "estimated_kld": o.estimated_kld}
                                             for o in options[name]}} for name, f in chosen.items()}}
