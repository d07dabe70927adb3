"""How far a correct program's logits may be from exact arithmetic on its weights, on any CPU.

The reference is the program's own weights computed in the next wider float (fp32 for an fp16
program, fp64 for an fp32 one). Its rounding is 2^-13 (or 2^-29) of the program's, so a
program's distance from it is the program's own rounding error and nothing else.

Two programs of one dtype over one graph (eager torch, an XNNPACK twin) round every stored
activation, each op's output, to that dtype at the same points. That rounding, amplified by the
network, sets their distance from the reference, and eager torch's distance (``eager_distance``)
measures it on the very inputs and weights. Their kernels differ in how they add up the K terms
of a dot product (a linear's input width, attention's head_dim and cache + new tokens, a norm's
mean):

- eager torch, and XNNPACK on x86 without AVX512-FP16, accumulate fp16 in fp32 and round each
  result once;
- XNNPACK's fp16 kernels on CPUs with AVX512-FP16 (Sapphire Rapids) or ARMv8.2 FP16 arithmetic
  accumulate in fp16 registers, one FMA per term: the running sum is rounded K times.

K roundings of partial sums that are, in expectation, no larger than the result, and
independent, add up in quadrature to sqrt(K) times the result's one rounding. So even if all of
eager's error came from rounding dot products, a correct program is within (1 + sqrt(K)) times
eager's distance, K the model's longest reduction. Rounding a few times inside an fp16
elementwise kernel (a polynomial exp) instead of once is well within that at any K >= 16.
The same holds for fp32 programs, whose kernels only sum in other orders than eager's.

This is a statistical bound, not a worst case: the worst case (K * u of every product's size,
per dot product) would allow ~sqrt(K) times more and catch little. tests/test_float_bounds.py
checks it against an emulation of the worst kernel, term-by-term accumulation on every
reduction: on the wide tiny model (K = 1024) that emulation is 5-7x eager's distance where the
bound allows 33x, while a wrong weight moves the logits by their own size, over 10x the bound.
A factor 2 would not do: the emulation exceeds it, and so did the twin on an AVX512-FP16 CPU
(0.034 from eager fp16, which is ~0.009 from the reference).
"""

import math

import torch
from torch.utils import _pytree as pytree

from ane_build.checkpoint import canonical

REFERENCE_DTYPES = {torch.float16: torch.float32, torch.float32: torch.float64}
# An eager result may land almost exactly on the reference by chance; a correct program then
# still differs by the rounding of the logits themselves, a few units in their last place.
FLOOR_ULPS = 4
# The weight the tests get wrong, its rows reversed (``.flip(0)``): layer 1's attention output
# added to the wrong channels. A bound must catch it.
WRONG_WEIGHT = "layers.1.attention.wo.weight"
# The atol of fp32 programs of the tiny model (tests/tiny_llama.py: logits ~3, no sum longer than
# 128 terms) against one another or fp64. They differ by summation order and rounding alone:
# ~sqrt(128) * 2^-24 * 3 = 2e-6 per dot product, a few times that through two layers (an XNNPACK
# twin: 2e-6). Every fp32 kernel sums in fp32, so 1e-4 holds on any CPU, and a wrong mask, cache
# row or rotary table moves the logits by more than 1e-3.
TINY_FP32_ATOL = 1e-4


def unit_roundoff(dtype):
    """The largest relative error of one rounding to ``dtype``: 2^-11 for fp16, 2^-24 for fp32."""
    return torch.finfo(dtype).eps / 2


def cast_floats(tree, dtype):
    """``tree`` (a model's inputs) with its floating tensors in ``dtype``."""
    return pytree.tree_map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def longest_reduction(spec):
    """K of the longest sum a model of ``spec`` computes: a linear's input width (dim, hidden_dim,
    n_heads * head_dim), the norms' mean over dim, attention's head_dim-long scores and its
    weighted sum over the cache and the call's tokens."""
    params, ane = spec["params"], spec["ane"]
    return max(params["dim"], params["hidden_dim"], params["n_heads"] * canonical.head_dim(params),
               ane["cache_size"] + ane["seq_length"])


def distance(got, reference):
    return (got.to(reference.dtype) - reference).abs().max().item()


def rounding_floor(reference, dtype):
    """FLOOR_ULPS roundings to ``dtype`` of the reference's largest logit."""
    return FLOOR_ULPS * unit_roundoff(dtype) * reference.abs().max().item()


def allowed_distance(eager_distance, reference, dtype, reduction_length):
    """The largest distance from ``reference`` a correct ``dtype`` program may show, given eager
    torch's ``eager_distance`` on the same inputs: see the module docstring."""
    return (1 + math.sqrt(reduction_length)) * eager_distance + rounding_floor(reference, dtype)
