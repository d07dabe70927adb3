"""``blocks.safetensors``: a GGUF checkpoint's own quantized blocks, beside its float weights.

convert reads each linear weight's blocks from the GGUF's bytes (``gguf_blocks.py``) and writes
them here: ``<weight>.qdata`` int8 [out, in], ``<weight>.scale`` and ``<weight>.zero`` fp32
[out, in / block], and in its metadata each weight's GGUF type and bits, and the linears whose
type is not carried (``refused``). rewrite carries the file forward under the rewritten names
(``rewritten``: a split linear's chunk takes its rows). What quantize makes of them:
``ane_build/quant/source_blocks.py``.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

FILE = "blocks.safetensors"
_CHUNK = re.compile(r"^(.*)\.chunks\.(\d+)$")
_PARTS = ("qdata", "scale", "zero")


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


def chunk_of(name):
    """(the layer, the chunk's index) of the linear ``name`` in a rewritten model: ``output.chunks.3`` is
    chunk 3 of ``output`` (its rows 3n .. 4n, n its width); a layer left whole is its own chunk 0."""
    match = _CHUNK.match(name)
    return (match[1], int(match[2])) if match else (name, 0)


def rewritten(source, model):
    """``source`` under the rewritten ``model``'s weight names: the chunk ``<layer>.chunks.<i>`` of
    a linear split on its outputs takes rows i*n .. (i+1)*n of the layer's blocks (n its width)."""
    out = Source({}, {})
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        layer, i = chunk_of(name)
        whole, weight = f"{layer}.weight", f"{name}.weight"
        if whole in source.blocks:
            rows = module.out_features
            out.blocks[weight] = source.blocks[whole].rows(i * rows, (i + 1) * rows)
        elif whole in source.refused:
            out.refused[weight] = source.refused[whole]
    return out
