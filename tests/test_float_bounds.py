"""float_bounds against the worst kernel XNNPACK may compute with, emulated in eager torch.

XNNPACK accumulates fp16 in fp32 on x86 without AVX512-FP16, in fp16 on CPUs with AVX512-FP16 or
ARMv8.2 FP16 arithmetic. Emulating the latter makes the bound's test independent of the CPU it
runs on. No ExecuTorch: the wide tiny model, as test_export's decode build has it.
"""

import copy

import pytest
import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ane_build.model import io
from tests import float_bounds
from tests.stages.tiny_entries import ane, build, later_call_inputs
from tests.tiny_llama import WIDE


def sequential_matmul(a, b):
    """a @ b ([..., M, K] @ [..., K, N]) as a kernel accumulating in a's dtype does it: each output
    summed term by term, the running sum rounded to that dtype after every term."""
    total = torch.zeros((), dtype=a.dtype)
    for k in range(a.shape[-1]):
        # fp64 holds the product of two fp16 or fp32 numbers exactly, and rounding its sum with the
        # running total to fp64 first alters the final rounding only in rare ties: one rounding per
        # term, as a fused multiply-add.
        total = (total.double() + a[..., k, None].double() * b[..., k, None, :].double()).to(a.dtype)
    return total


def sequential_sum(x):
    """x.sum(-1, keepdim=True) accumulated term by term (times 1 is exact)."""
    return sequential_matmul(x, torch.ones(x.shape[-1], 1, dtype=x.dtype))


def sequential_softmax(x):
    """x.softmax(-1) with its sum accumulated term by term."""
    exps = (x - x.amax(-1, keepdim=True)).exp()
    return exps / sequential_sum(exps)


class SequentialAccumulation(TorchFunctionMode):
    """Every reduction of AneLlama accumulated term by term in the model's dtype: its linears (no
    bias), attention's two matmuls and its softmax's sum, and SafeRMSNorm's mean(-1, keepdim=True),
    the model's only mean."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return sequential_matmul(args[0], args[1].T)
        if func is torch.bmm:
            return sequential_matmul(*args)
        if func is torch.Tensor.softmax:
            assert args[1:] in ((-1,), ()) and kwargs.get("dim", -1) == -1, "softmax over the last axis only"
            return sequential_softmax(args[0])
        if func is torch.Tensor.mean:
            return sequential_sum(args[0]) / args[0].shape[-1]
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The wide tiny model's rewrite entry: split linears and a decode method, as test_export builds it."""
    entries, _ = build(tmp_path_factory.mktemp("wide"), "rewrite", model_params=WIDE,
                       ane_params=ane(target_split_size=512, decode_method=True))
    return entries["rewrite"]


def measure(entry, dtype, run):
    """{method: (run's distance from exact arithmetic, eager torch's, the bound on a correct program's)}.

    ``run(model, inputs)`` -> logits: a program computed from the entry's model in ``dtype``.
    """
    spec, exact_dtype = io.read_spec(entry), float_bounds.REFERENCE_DTYPES[dtype]
    model, reference = io.load_model(entry).to(dtype), io.load_model(entry).to(exact_dtype)
    out = {}
    for method, seq_length in io.methods(spec["ane"]).items():
        inputs = float_bounds.cast_floats(later_call_inputs(spec, seq_length, method=method), dtype)
        exact = reference(*float_bounds.cast_floats(inputs, exact_dtype))[0]
        eager = float_bounds.distance(model(*inputs)[0], exact)
        allowed = float_bounds.allowed_distance(eager, exact, dtype, float_bounds.longest_reduction(spec))
        out[method] = float_bounds.distance(run(model, inputs), exact), eager, allowed
    return out


def accumulating_term_by_term(model, inputs):
    with SequentialAccumulation():
        return model(*inputs)[0]


def with_a_wrong_weight(model, inputs):
    wrong = copy.deepcopy(model)
    weight = wrong.get_parameter(float_bounds.WRONG_WEIGHT)
    weight.copy_(weight.flip(0))
    return wrong(*inputs)[0]


# How much further than eager torch the emulation must land for it to be the harsher kernel. In
# fp16 eager rounds each dot product once and the emulation K times: more than twice as far, so a
# bound of twice eager's distance would fail it. In fp32 eager sums in fp32 too, in another order.
@pytest.mark.parametrize("dtype, beyond", [(torch.float16, 2), (torch.float32, 1)], ids=["fp16", "fp32"])
def test_a_kernel_accumulating_term_by_term_stays_within_the_bound(wide, dtype, beyond):
    for method, (emulated, eager, allowed) in measure(wide, dtype, accumulating_term_by_term).items():
        assert beyond * eager < emulated <= allowed, method


def test_a_wrong_weight_is_beyond_the_bound(wide):
    for method, (wrong, _, allowed) in measure(wide, torch.float16, with_a_wrong_weight).items():
        assert wrong > allowed, method
