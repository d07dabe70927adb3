import pytest
import torch
from torch import nn

from ane_build.quant import calibrated, mixed
from ane_build.util.errors import UserError

SETTINGS = {"fit": "gptq", "palette_group": 4, "mapping": "asymmetric", "budget_mb": None,
            "candidates": ["c8w", "lut4"]}


def modules_and_stats(n=5):
    gen = torch.Generator().manual_seed(0)
    modules, stats = {}, {}
    for i in range(n):
        linear = nn.Linear(32, 8 * (i + 1), bias=False)
        linear.weight = nn.Parameter(torch.randn(linear.weight.shape, generator=gen), requires_grad=False)
        inputs = torch.randn(64, 32, generator=gen)
        modules[f"l{i}"] = linear
        stats[f"l{i}"] = {"fisher": torch.rand(linear.weight.shape, generator=gen), "xtx": inputs.T @ inputs,
                          "tokens": 64}
    return modules, stats


@pytest.mark.parametrize("jobs_variable", ["1", "2"])
def test_every_fit_comes_back_in_the_order_asked_as_one_by_one(jobs_variable, monkeypatch):
    monkeypatch.setenv("ANE_BUILD_JOBS", jobs_variable)
    modules, stats = modules_and_stats()
    jobs = [(name, kind) for name in modules for kind in ("c8w", "lut4")][:-1]  # an odd count
    done = mixed.fit_all(jobs, modules, SETTINGS, stats)
    for (name, kind), got in zip(jobs, done, strict=True):
        want = calibrated.fit(modules[name].weight, stats[name]["fisher"], stats[name]["xtx"], kind, "gptq", 4,
                              False)
        assert (got.kind, got.bytes, got.estimated_kld) == (want.kind, want.bytes, want.estimated_kld)
        assert all(torch.equal(g, w) for g, w in zip(got.codes, want.codes) if w is not None)


def test_the_allocation_says_what_each_linear_got_and_refuses_a_budget_too_small():
    modules, stats = modules_and_stats(3)
    options = {name: mixed.fit_all([(name, k) for k in ("c8w", "lut4")], modules, SETTINGS, stats) for name in modules}
    sizes = {name: [o.bytes for o in opts] for name, opts in options.items()}
    budget = (100 + sum(max(s) for s in sizes.values()) - 1) / 1e6  # one byte short of 8 bits everywhere
    chosen, report = mixed.allocation(options, 100, {**SETTINGS, "budget_mb": budget})
    assert 100 + sum(f.bytes for f in chosen.values()) <= budget * 1e6 and report["kinds"]["lut4"] >= 1
    assert {name: layer["kind"] for name, layer in report["layers"].items()} == {n: f.kind for n, f in chosen.items()}
    with pytest.raises(UserError, match=r"^quantize.budget_mb=0.0001: the weights take at least"):
        mixed.allocation(options, 100, {**SETTINGS, "budget_mb": 0.0001})
