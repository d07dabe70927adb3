"""A GGUF tensor's quantized blocks as torchao's block affine form: w = (qdata - zero) * scale.

Read from the file's bytes (llama.cpp's ggml-common.h layouts), not from the dequantized
weights, so nothing is re-quantized: ``qdata`` holds the block's own integers, shifted into
torchao's signed range (q - 2**(bits-1)), and ``scale`` its own scale. Every type llama.cpp
uses for llama weights is exactly of this form, per block of 32 inputs or, for Q2_K, Q3_K and
Q6_K, per sub-block of 16:

- Q8_0: fp16 d, 32 int8 q; w = d*q.
- Q4_0: fp16 d, 16 bytes (low nibbles are elements 0..15, high ones 16..31); w = d*(q-8).
- Q4_1: fp16 d, fp16 m, 16 bytes as Q4_0; w = d*q + m.
- Q5_0 / Q5_1: as Q4_0 / Q4_1 with a 5th bit per element in a uint32; w = d*(q-16), d*q + m.
- Q4_K / Q5_K: 256 elements, fp16 d and dmin, 6-bit sc and m per sub-block of 32;
  w = (d*sc)*q - dmin*m.
- Q2_K: 256 elements, 4-bit sc and m per sub-block of 16; w = (d*sc)*q - dmin*m.
- Q3_K: 256 elements, 6-bit sc (minus 32) per sub-block of 16, q of 3 bits; w = (d*sc)*(q-4).
- Q6_K: 256 elements, int8 sc per sub-block of 16, q of 6 bits; w = (d*sc)*(q-32).

So w = s*q + a per sub-block, s and a exact fp32 products of the file's fp16 numbers and small
integers. Then zero = -2**(bits-1) - a/s (0 for the symmetric types, exactly). A sub-block with
s = 0 is the constant a: it becomes qdata 1, zero 0, scale a (the same numbers, a form torchao
can hold). Checked against ``gguf.quants.dequantize`` in tests/checkpoint/test_gguf.py.
"""

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ane_build.checkpoint.blocks import Blocks


def _f16(raw):
    return raw.copy().view(np.float16).astype(np.float32)


def _nibbles(qs):
    """Bytes [..., k] -> 2k 4-bit values: the k low nibbles, then the k high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed, shifts, width):
    """Bytes [..., k] -> [..., len(shifts), k]: the ``width``-bit field at each shift of every byte."""
    return (packed[..., None, :] >> np.asarray(shifts, dtype=np.uint8)[:, None]) & np.uint8((1 << width) - 1)


def _high_bits(qh, n):
    """A little-endian uint32 per block (4 bytes) -> its bits 0..n-1, one per element."""
    word = qh.copy().view(np.uint32)
    return ((word >> np.arange(n, dtype=np.uint32)) & 1).astype(np.uint8)


def _q8_0(b):
    d = _f16(b[:, 0:2])
    return b[:, 2:].view(np.int8).astype(np.int16) + 128, d, -128 * d


def _q4_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:]), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5_0(b):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6], 32) << 4), d, -16 * d


def _q5_1(b):
    return _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8], 32) << 4), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _k_scales(s):
    """Q4_K / Q5_K: 12 bytes -> the 8 sub-blocks' 6-bit scales and mins (llama.cpp's get_scale_min_k4)."""
    low, mins, high = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([low & 0x3F, (high & 0x0F) | ((low >> 6) << 4)], axis=1)
    m = np.concatenate([mins & 0x3F, (high >> 4) | ((mins >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _low_nibbles_k(qs):
    """Q4_K / Q5_K: 128 bytes -> 8 sub-blocks of 32: chunk c of 32 bytes holds sub-blocks 2c
    (low nibbles) and 2c+1 (high nibbles)."""
    return _nibbles(qs.reshape(-1, 4, 32)).reshape(-1, 8, 32)


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    return _low_nibbles_k(b[:, 16:144]), d * sc, -(dmin * m)


def _q5_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    high = _bits(b[:, 16:48], range(8), 1)  # sub-block s, element e: bit s of byte e
    return _low_nibbles_k(b[:, 48:176]) | (high << 4), d * sc, -(dmin * m)


def _two_bit_halves(qs):
    """Q2_K / Q3_K: 64 bytes -> 256 2-bit values: half h, element k*32 + e is bits 2k of byte h*32 + e."""
    return _bits(qs.reshape(-1, 2, 32), (0, 2, 4, 6), 2).reshape(-1, 16, 16)


def _q2_k(b):
    scales, d, dmin = b[:, 0:16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    return _two_bit_halves(b[:, 16:80]), d * (scales & 0x0F), -(dmin * (scales >> 4))


def _q3_k(b):
    d, s = _f16(b[:, 108:110]), b[:, 96:108]
    low = _nibbles(s[:, 0:8])  # 16 low halves
    high = _bits(s[:, 8:12], (0, 2, 4, 6), 2).reshape(-1, 16)  # sub-block k*4 + j: bits 2k of byte j
    sc = ((low | (high << 4)).astype(np.int16) - 32).astype(np.float32)
    hbit = _bits(b[:, 0:32], range(8), 1).reshape(-1, 16, 16)  # element k*32 + e: bit k of byte e
    s_ = d * sc
    return _two_bit_halves(b[:, 32:96]) | (hbit << 2), s_, -4 * s_


def _q6_k(b):
    ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
    sc, d = b[:, 192:208].view(np.int8).astype(np.float32), _f16(b[:, 208:210])
    # Half h of 128: elements 0..63 low nibbles of its 64 ql bytes, 64..127 high ones; bits 4-5
    # of element k*32 + e are bits 2k of qh byte e.
    q = _nibbles(ql) | (_bits(qh, (0, 2, 4, 6), 2).reshape(-1, 2, 128) << 4)
    s_ = d * sc
    return q.reshape(-1, 16, 16), s_, -32 * s_


# GGUF type -> (bits, elements per scale, parser of [n_blocks, type_size] bytes).
CARRIED = {
    "Q8_0": (8, 32, _q8_0), "Q4_0": (4, 32, _q4_0), "Q4_1": (4, 32, _q4_1),
    "Q5_0": (5, 32, _q5_0), "Q5_1": (5, 32, _q5_1),
    "Q2_K": (2, 16, _q2_k), "Q3_K": (3, 16, _q3_k), "Q4_K": (4, 32, _q4_k),
    "Q5_K": (5, 32, _q5_k), "Q6_K": (6, 16, _q6_k),
}


def read(tensor):
    """The ``Blocks`` of a 2-D GGUF ``ReaderTensor`` of a CARRIED type, else None."""
    kind = GGMLQuantizationType(tensor.tensor_type).name
    if kind not in CARRIED:
        return None
    bits, size, parse = CARRIED[kind]
    cols, rows = (int(n) for n in tensor.shape)  # GGUF lists the innermost dimension first
    raw = np.asarray(tensor.data).reshape(-1, GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1])
    q, s, a = parse(raw)
    q, s, a = q.reshape(-1, size), s.reshape(-1).astype(np.float32), a.reshape(-1).astype(np.float32)
    half = 1 << (bits - 1)
    qdata = q.astype(np.int16) - half
    flat = s == 0  # a constant sub-block, w = a: one step of size a
    qdata[flat] = 1
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(flat, 0.0, -half - a.astype(np.float64) / s.astype(np.float64))
    scale = np.where(flat, a, s)
    return Blocks(qdata=torch.from_numpy(qdata.astype(np.int8).reshape(rows, cols)),
                  scale=torch.from_numpy(scale.astype(np.float32).reshape(rows, cols // size)),
                  zero=torch.from_numpy(zero.astype(np.float32).reshape(rows, cols // size)),
                  type=kind, bits=bits)
