"""``quantize.linear: source``: a GGUF checkpoint's own quantized blocks, carried into the program.

Why: a GGUF's weights are already quantized by llama.cpp (SmolLM2's linears are Q4_1: a scale
and an offset per block of 32 inputs). Quantizing their dequantized values again on another
grid loses what the blocks say (one 4-bit grid per channel keeps 0.47 of fp32's top-1 tokens),
while every llama.cpp block format is exactly torchao's block affine form, w = (q - zero) *
scale per block of inputs, which Core ML (iOS18) stores as ``constexpr_blockwise_shift_scale``.
So the program can hold the checkpoint's own integers and scales: for the Mac GPU, and as the
fidelity reference other schemes are measured against. The Neural Engine does not run per-block
scales (research/ane_rules.md): on CPU_AND_NE, Core ML dequantizes them on the GPU or CPU.

How: convert reads each linear weight's blocks from the GGUF's bytes (checkpoint/gguf_blocks.py)
and writes ``blocks.safetensors`` beside model.safetensors: ``<weight>.qdata`` int8 [out, in],
``<weight>.scale`` and ``<weight>.zero`` fp32 [out, in / block], and in its metadata each
weight's GGUF type and bits, and the linears whose type is not carried (``refused``). rewrite
carries the file forward under the rewritten names (``rewritten``: a split linear's chunk takes
its rows); quantize turns each blocks into torchao's ``IntxUnpackedToInt8Tensor`` (``quantize``),
which exports as ``torchao.dequantize_affine`` on those constants. Nothing is re-quantized.

Precision: torchao computes (qdata - zero) in the model's dtype and Core ML at fp16 precision
stores scale and offset in fp16: in an fp16 program the zero point (nonzero only for the types
with an offset, Q4_1, Q5_1 and the K-quants) and the K-quants' d*sc scales round to fp16. The
weights then differ from the GGUF's by a few fp16 roundings of the scale product
(tests/test_source_blocks.py states the bound).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ane_build.errors import UserError

FILE = "blocks.safetensors"
_PARTS = ("qdata", "scale", "zero")
_CHUNK = re.compile(r"^(.*)\.chunks\.(\d+)$")
FALLBACK = "use c8w (or c4w, b4w) for it, with quantize.overrides if only some layers lack blocks"


@dataclass
class Blocks:
    """One weight as w = (qdata - zero) * scale per block of ``block`` inputs."""

    qdata: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # fp32 [out, in / block]
    zero: torch.Tensor  # fp32 [out, in / block]
    type: str  # the GGUF type it came from
    bits: int  # bits of each integer (in qdata: shifted into -2**(bits-1) .. 2**(bits-1) - 1)

    @property
    def block(self):
        return self.qdata.shape[1] // self.scale.shape[1]

    def dequantize(self):
        """The fp32 weight, computed in fp64 (rounded once)."""
        q = self.qdata.double().unflatten(1, (-1, self.block))
        return ((q - self.zero.double()[..., None]) * self.scale.double()[..., None]).flatten(1).float()

    def rows(self, start, stop):
        return Blocks(*(getattr(self, p)[start:stop].clone() for p in _PARTS), self.type, self.bits)

    def tensor(self, dtype):
        """torchao's tensor of these numbers, dequantizing to ``dtype`` (no re-quantization).

        Core ML's converter takes 4-bit (-8..7) or 8-bit ranges: 2- to 4-bit integers are int4,
        5- to 8-bit ones int8."""
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            IntxUnpackedToInt8Tensor,
        )

        target = torch.int4 if self.bits <= 4 else torch.int8
        return IntxUnpackedToInt8Tensor(self.qdata, self.scale, self.zero, target, (1, self.block), dtype, None)


@dataclass
class Source:
    """A checkpoint's blocks: {weight name: Blocks}, and {weight name: GGUF type} of the linear
    weights whose type is not carried (float, or a type this module does not read)."""

    blocks: dict
    refused: dict

    def __bool__(self):
        return bool(self.blocks or self.refused)

    def info(self):
        """What checkpoint.json records: each weight's type, bits and block size, and the refused."""
        tensors = {name: {"type": b.type, "bits": b.bits, "block": b.block} for name, b in sorted(self.blocks.items())}
        return {"file": FILE, "tensors": tensors, "refused": dict(sorted(self.refused.items()))}


def save(source, folder):
    from safetensors.torch import save_file

    tensors = {f"{name}.{p}": getattr(b, p).contiguous() for name, b in source.blocks.items() for p in _PARTS}
    info = {name: {"type": b.type, "bits": b.bits} for name, b in source.blocks.items()}
    metadata = {"blocks": json.dumps(info, sort_keys=True), "refused": json.dumps(source.refused, sort_keys=True)}
    save_file(tensors, str(Path(folder) / FILE), metadata=metadata)


def load(folder):
    """The Source of an entry (convert or rewrite); empty when it has no blocks file."""
    from safetensors import safe_open

    path = Path(folder) / FILE
    if not path.is_file():
        return Source({}, {})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        blocks = {name: Blocks(*(f.get_tensor(f"{name}.{p}") for p in _PARTS), i["type"], i["bits"])
                  for name, i in json.loads(meta["blocks"]).items()}
    return Source(blocks, json.loads(meta["refused"]))


def rewritten(source, model):
    """``source`` under the rewritten ``model``'s weight names: the chunk ``<layer>.chunks.<i>`` of
    a linear split on its outputs takes rows i*n .. (i+1)*n of the layer's blocks (n its width)."""
    out = Source({}, {})
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        match = _CHUNK.match(name)
        layer, i = (match[1], int(match[2])) if match else (name, 0)
        whole, weight = f"{layer}.weight", f"{name}.weight"
        if whole in source.blocks:
            rows = module.out_features
            out.blocks[weight] = source.blocks[whole].rows(i * rows, (i + 1) * rows)
        elif whole in source.refused:
            out.refused[weight] = source.refused[whole]
    return out


def require(source, layer):
    """The Blocks of linear ``layer``, or a UserError saying why there are none."""
    weight, source = f"{layer}.weight", source or Source({}, {})
    if weight in source.blocks:
        return source.blocks[weight]
    carried = "/".join(_carried())
    if weight in source.refused:
        raise UserError("", f"quantize.linear=source: layer {layer} is {source.refused[weight]} in the GGUF, "
                            f"not block-quantized in a type source carries ({carried}); {FALLBACK}")
    raise UserError("", f"quantize.linear=source: layer {layer} has no quantized blocks in the checkpoint "
                        f"(a GGUF source with {carried} weights); {FALLBACK}")


def _carried():
    from ane_build.checkpoint.gguf_blocks import CARRIED

    return tuple(CARRIED)


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
        module.weight = nn.Parameter(blocks.tensor(module.weight.dtype), requires_grad=False)


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
