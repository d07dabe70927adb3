"""Palettize linear weights: a k-means look-up table of 2**bits values per group of output channels.

Why: the Neural Engine wants per-channel scales or palettes, not per-block int4 scales
(DESIGN.md, research/ane_rules.md R35/R36), and it decompresses palettes of 1, 2, 4, 6 and 8 bits
natively. A k-means palette puts its values where the weights are (most near zero, a few in the
tails), so its mean squared error is below a per-channel grid's of the same bits. Squared error
is all it minimises, though: the rare large weights end in clusters of smaller ones. On
SmolLM2-135M 4-bit palettes therefore follow the fp32 model less well than 4-bit per-channel grids
do (mean KLD 1.3 against 0.7), and 6 bits, 16 rows a table, is the useful setting (0.025; int8 per
channel: 0.003).

How: torchao's ``codebook_coreml`` prototype. Each group of ``group_size`` rows of a weight gets
its own table, fitted by coremltools' k-means (scikit-learn's KMeans, which executorch brings;
k-means++ with a fixed seed: the same weights give the same tables). The weight becomes a
``CodebookQuantizedTensor``; after ``torchao.utils.unwrap_tensor_subclass`` it exports as
``quant.dequantize_codebook`` on constant codes and table, which ExecuTorch's Core ML backend turns
into Core ML's ``constexpr_lut_to_dense`` (uint{bits} indices, a table in the model's precision)
and the CPU twin's constant propagation folds into a plain weight, as it does ``dequantize_affine``.
A process loading such a saved program must import ``torchao.prototype.quantization.codebook_coreml``
first: that registers the op.

Groups run along the output channels (rows), as coremltools' ``per_grouped_channel`` does for a
linear by default: coremltools' docs find 8 or 16 channels a group a good balance of accuracy and
speed (more tables, slower decompression); ``group_size=None`` gives one table for the whole weight.
"""

import torch
from torch import nn

# The palette sizes the Neural Engine accelerates (coremltools also takes 3 bits, the NE not).
BITS = (1, 2, 4, 6, 8)


def palettize_linears(model, bits, group_size=16, module_filter=None):
    """Palettize in place every ``nn.Linear`` of ``model`` that ``module_filter(module, name)`` accepts
    (all of them when it is None), one table per ``group_size`` rows; returns ``model``."""
    from threadpoolctl import threadpool_limits
    from torchao.prototype.quantization.codebook_coreml import CodebookWeightOnlyConfig
    from torchao.quantization.quant_api import quantize_

    def chosen(module, name):
        return isinstance(module, nn.Linear) and (module_filter is None or module_filter(module, name))

    _check(model, bits, group_size, chosen)
    # Each k-means (2**bits clusters of ~10,000 weights) is too small to share: on two cores
    # scikit-learn's OpenMP threads mostly wait on each other (a 1536x576 weight at 6 bits: 8 s
    # of CPU on two threads, 2.4 s on one), and one thread gives the same tables on any machine.
    with threadpool_limits(1):
        quantize_(model, CodebookWeightOnlyConfig(dtype=code_dtype(bits), block_size=block_size(group_size)), chosen)
    return model


def code_dtype(bits):
    """torch's dtype for ``bits``-bit codes (stored one a byte; the Core ML program packs them)."""
    return torch.uint8 if bits == 8 else getattr(torch, f"uint{bits}")


def block_size(group_size):
    """torchao's block of a weight sharing one table: ``group_size`` rows by every column."""
    return [-1 if group_size is None else group_size, -1]


def _check(model, bits, group_size, chosen):
    """Refuse up front what torchao would only assert deep inside, naming the layer."""
    if bits not in BITS:
        raise ValueError(f"palettize: {bits} bits; the Neural Engine accelerates palettes of {BITS} bits")
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"palettize: group_size={group_size!r}; expected a positive integer, or None for one table")
    for name, module in model.named_modules():
        if chosen(module, name) and module.out_features % group_size:
            raise ValueError(f"palettize: group_size={group_size} does not divide layer {name}'s "
                             f"{module.out_features} output channels")
