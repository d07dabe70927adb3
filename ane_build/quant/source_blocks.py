"""``quantize.linear: source``: a GGUF checkpoint's own quantized blocks, carried into the program.

Why: a GGUF's weights are already quantized by llama.cpp (SmolLM2's linears are Q4_1: a scale
and an offset per block of 32 inputs). Quantizing their dequantized values again on another
grid loses what the blocks say (one 4-bit grid per channel keeps 0.47 of fp32's top-1 tokens),
while every llama.cpp block format is exactly torchao's block affine form, w = (q - zero) *
scale per block of inputs, which Core ML (iOS18) stores as ``constexpr_blockwise_shift_scale``.
So the program can hold the checkpoint's own integers and scales: for the Mac GPU, and as the
fidelity reference other schemes are measured against. The Neural Engine does not run per-block
scales (research/ane_rules.md): on CPU_AND_NE, Core ML dequantizes them on the GPU or CPU.

How: convert and rewrite carry each linear weight's blocks in ``blocks.safetensors``
(``ane_build/checkpoint/blocks.py``); quantize turns each into torchao's ``IntxUnpackedToInt8Tensor`` (``quantize``),
which exports as ``torchao.dequantize_affine`` on those constants. Nothing is re-quantized.

Precision: torchao computes (qdata - zero) in the model's dtype and Core ML at fp16 precision
stores scale and offset in fp16: in an fp16 program the zero point (nonzero only for the types
with an offset, Q4_1, Q5_1 and the K-quants) and the K-quants' d*sc scales round to fp16. The
weights then differ from the GGUF's by a few fp16 roundings of the scale product
(tests/test_source_blocks.py states the bound).
"""

import torch
from torch import nn

from ane_build.checkpoint.blocks import Source
from ane_build.checkpoint.gguf_blocks import CARRIED
from ane_build.util.errors import UserError

FALLBACK = "use c8w (or c4w, b4w) for it, with quantize.overrides if only some layers lack blocks"


def require(source, layer):
    """The Blocks of linear ``layer``, or a UserError saying why there are none."""
    weight, source = f"{layer}.weight", source or Source({}, {})
    if weight in source.blocks:
        return source.blocks[weight]
    carried = "/".join(CARRIED)
    if weight in source.refused:
        raise UserError("", f"quantize.linear=source: layer {layer} is {source.refused[weight]} in the GGUF, "
                            f"not block-quantized in a type source carries ({carried}); {FALLBACK}")
    raise UserError("", f"quantize.linear=source: layer {layer} has no quantized blocks in the checkpoint "
                        f"(a GGUF source with {carried} weights); {FALLBACK}")


def group(source, layer):
    """(weight group name, bits) of linear ``layer`` for quantize's weight_groups."""
    blocks = require(source, layer)
    return f"linear:source:{blocks.type}", blocks.bits


def quantize(model, layers, source):
    """Give each linear named in ``layers`` its checkpoint blocks as its weight, in place."""
    for layer in layers:
        module = model.get_submodule(layer)
        blocks = require(source, layer)
        _check_same_weight(blocks, module.weight, layer)
        module.weight = nn.Parameter(as_torchao(blocks, module.weight.dtype), requires_grad=False)


def _check_same_weight(blocks, weight, layer):
    """The blocks must be the weight the model holds (a wiring check: the two come from one
    convert entry); in the model's dtype they agree within a rounding to it of each term."""
    if tuple(blocks.qdata.shape) != tuple(weight.shape):
        raise RuntimeError(f"{layer}: blocks of shape {list(blocks.qdata.shape)} for a weight of {list(weight.shape)}")
    got, want = blocks.dequantize(), weight.detach().float()
    terms = (blocks.qdata.float().abs().unflatten(1, (-1, blocks.block)) + blocks.zero.abs()[..., None]) \
        * blocks.scale.abs()[..., None]
    allowed = torch.finfo(weight.dtype).eps * (want.abs() + terms.flatten(1)) + torch.finfo(weight.dtype).tiny
    if ((got - want).abs() > allowed).any():
        raise RuntimeError(f"{layer}: its blocks dequantize to another weight than the model's "
                           f"(max difference {(got - want).abs().max().item():.3g})")


def as_torchao(blocks, dtype):
    """torchao's tensor of ``blocks``' numbers, dequantizing to ``dtype`` (no re-quantization).

    Core ML's converter takes 4-bit (-8..7) or 8-bit ranges: 2- to 4-bit integers are int4,
    5- to 8-bit ones int8."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    target = torch.int4 if blocks.bits <= 4 else torch.int8
    return IntxUnpackedToInt8Tensor(blocks.qdata, blocks.scale, blocks.zero, target, (1, blocks.block), dtype, None)
