"""Data-aware quantization of one linear: its codes fitted with the calibration's statistics.

``fit`` quantizes a linear's weight as a kind (c4w, c8w, lut4, lut6) the recipe's ``quantize.fit``
way, and says what that costs: its bytes, and 0.5 * sum(F * dw**2), the KL divergence the change
is estimated to add (``calibration``: F the Fisher diagonal). The allocator compares those numbers
across layers and kinds (``allocate``); ``Fitted.apply`` then gives the linear the chosen codes as
torchao's tensors, which export as the data-free kinds do (``dequantize_affine`` per channel,
``dequantize_codebook`` for palettes), so the Core ML program and the twin see nothing new.

- fisher: palettes by Fisher-weighted k-means (``sensitive_kmeans``: SqueezeLLM's sensitive
  k-means); grids as data-free (min-max per channel, round to nearest).
- gptq: the fisher palettes' tables, then every code chosen by GPTQ's error feedback
  (``gptq``: later columns absorb each rounding's error through x^T x); grids by GPTQ too.
- data-free: plain k-means palettes and min-max grids, only to estimate a layer for the allocator.
"""

from dataclasses import dataclass

import torch

from ane_build.checkpoint.blocks import chunk_of
from ane_build.quant import gptq, sensitive_kmeans

GRID_BITS = {"c4w": 4, "c8w": 8}
PALETTE_BITS = {"lut4": 4, "lut6": 6}
# GPTQ's dampening, as a fraction of x^T x's mean diagonal: 0.1 rather than the paper's 0.01. With the
# default 4096 calibration tokens a 1536-input layer (SmolLM2's w2) fits its calibration text and not
# other text at 0.01 (output error 0.16 of rounding's on it, 0.83 on held-out text); 0.1 to 0.3 did as
# well on held-out text as twice the tokens (0.51).
DAMP = 0.1
SCALE_BYTES = 2  # fp16 scales, zero points and table entries (int8 zero points are rounded up to 2)


@dataclass
class Fitted:
    kind: str
    bytes: int
    estimated_kld: float
    codes: tuple  # (qdata, scale, zero point) of a grid, (codes, tables) of a palette

    def to_numpy(self):
        return Fitted(self.kind, self.bytes, self.estimated_kld, tuple(_map(lambda t: t.numpy(), self.codes)))

    @classmethod
    def from_numpy(cls, fitted):
        return cls(fitted.kind, fitted.bytes, fitted.estimated_kld, tuple(_map(torch.from_numpy, fitted.codes)))

    def apply(self, linear, palette_group):
        """Give ``linear`` these codes as torchao's quantized weight; returns it."""
        if self.kind in GRID_BITS:
            return gptq.to_torchao(linear, *self.codes, GRID_BITS[self.kind])
        return sensitive_kmeans.palettize(linear, *self.codes, palette_group)


def _map(function, codes):
    return [None if c is None else function(c) for c in codes]


def rows_of(stats, name, out_features):
    """(Fisher rows [out, in], x^T x [in, in]) of the rewritten linear ``name``: a chunk
    ``<layer>.chunks.<i>`` of a split layer has rows i*n .. (i+1)*n of the layer's Fisher diagonal
    and the layer's inputs."""
    layer, i = chunk_of(name)
    layer_stats = stats[layer]
    return layer_stats["fisher"][i * out_features:(i + 1) * out_features], layer_stats["xtx"]


def fit(weight, fisher, xtx, kind, method, palette_group, symmetric):
    """``weight`` [out, in] quantized as ``kind`` by ``method`` (data-free, fisher, gptq): a ``Fitted``."""
    weight = weight.detach().float()
    if kind in GRID_BITS:
        codes = _grid(weight, xtx, GRID_BITS[kind], method, symmetric)
        dequantized = gptq.dequantize(*codes)
        size = weight.numel() * GRID_BITS[kind] // 8 + weight.shape[0] * SCALE_BYTES * (1 if symmetric else 2)
    elif kind in PALETTE_BITS:
        bits = PALETTE_BITS[kind]
        tables_fisher = None if method == "data-free" else fisher
        codes, tables = sensitive_kmeans.fit(weight, tables_fisher, bits, palette_group)
        if method == "gptq":
            codes = gptq.quantize_to_tables(weight, xtx, tables, palette_group, damp=DAMP)
        codes = (codes, tables)
        dequantized = sensitive_kmeans.dequantize(codes[0], tables, palette_group)
        size = weight.numel() * bits // 8 + tables.numel() * SCALE_BYTES
    else:
        raise ValueError(f"calibrated fit: kind {kind!r}; expected one of {(*GRID_BITS, *PALETTE_BITS)}")
    estimate = 0.5 * float((fisher.double() * (weight.double() - dequantized.double()).square()).sum())
    return Fitted(kind, size, estimate, codes)


def _grid(weight, xtx, bits, method, symmetric):
    if method == "gptq":
        return gptq.quantize_per_channel(weight, xtx, bits, symmetric=symmetric, damp=DAMP)
    scale, zero_point = gptq.min_max_grid(weight, bits, symmetric)
    zero_point = None if symmetric else zero_point
    return gptq.round_to_nearest(weight, scale, zero_point, bits), scale, zero_point
