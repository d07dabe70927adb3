"""The weights of a Core ML program as Core ML decompresses them: its ``constexpr_*`` ops, in numpy.

Written from the ops' definitions in coremltools 9.0 (``ops/defs/iOS16/constexpr_ops.py`` and
``ops/defs/iOS18/compression.py``), step for step, so the result is theirs to the bit: the
arithmetic is done in the dtype their ``decompress`` does it in (the scale's: fp16 for our
programs), with numpy's own fp16 rounding. Blocks are broadcast rather than repeated (as
``np.repeat`` there does), which gives the same values without a scale as large as the weight.

Each function takes the op's inputs as numpy arrays in their stored dtypes (the sub-byte
ones unpacked to one element per byte, as coremltools' blob reader gives them) and returns
the dense weight.
"""

import numpy as np


def _blocks(data_shape, param_shape):
    """(data viewed as blocks, params viewed to broadcast over them) shapes: each axis of
    ``data_shape`` split into (params along it, block size)."""
    blocked, broadcast = [], []
    for size, n in zip(data_shape, param_shape):
        if size % n:
            raise ValueError(f"an axis of {size} does not split into {n} blocks")
        blocked += [n, size // n]
        broadcast += [n, 1]
    return blocked, broadcast


def _arith(op, a, b):
    """``op(a, b)`` as numpy computes it, fp16 included (numpy computes an fp16 op in fp32 and rounds
    the result to fp16), with the fp16 rounding done by torch: numpy's own fp16 arithmetic is ~10x
    slower, which a model's worth of weights feels."""
    import torch

    dtype = np.result_type(a, b)
    if dtype != np.float16:
        return op(a, b)
    wide = op(np.asarray(a, np.float32), np.asarray(b, np.float32))
    return torch.from_numpy(np.ascontiguousarray(wide)).half().numpy()


def blockwise_shift_scale(data, scale, offset=None):
    """iOS18 ``constexpr_blockwise_shift_scale``: scale * (data - offset), a scale (and offset) per block."""
    blocked, broadcast = _blocks(data.shape, scale.shape)
    out = data.astype(scale.dtype).reshape(blocked)
    if offset is not None:
        out = _arith(np.subtract, out, offset.reshape(broadcast))
    return _arith(np.multiply, scale.reshape(broadcast), out).reshape(data.shape)


def lut_to_dense(indices, lut, vector_axis=None):
    """iOS18 ``constexpr_lut_to_dense``: each index looked up in its block's palette (lut
    [*blocks per axis, 2^bits, vector size]); a vector palette widens ``vector_axis``."""
    rank, vector = indices.ndim, lut.shape[-1]
    blocked, broadcast = _blocks(indices.shape, lut.shape[:rank])
    table = lut.reshape(broadcast + list(lut.shape[-2:]))
    picks = indices.astype(np.intp).reshape(blocked + [1, 1])
    out = np.take_along_axis(table, picks, axis=-2)  # [*blocked, 1, vector]
    out = out.reshape(list(indices.shape) + [vector])
    if vector == 1:
        return out[..., 0]
    axis = int(vector_axis) % rank
    out = np.moveaxis(out, -1, axis + 1)  # each index's vector right after it along the axis
    shape = list(indices.shape)
    shape[axis] *= vector
    return out.reshape(shape)


def lut_to_dense_ios16(lut, indices, shape):
    """iOS16 ``constexpr_lut_to_dense``: one palette for the whole tensor, indices flat."""
    count = int(np.prod(shape))
    return lut[indices.astype(np.intp).reshape(-1)[:count]].reshape(tuple(int(s) for s in shape))


def affine_dequantize(quantized_data, zero_point, scale, axis):
    """iOS16 ``constexpr_affine_dequantize``: scale * (data - zero_point), per channel along ``axis``
    (or per tensor), computed in fp32 and given in the scale's dtype, as coremltools does."""
    rank, axis = quantized_data.ndim, int(axis) % quantized_data.ndim

    def along_axis(param):
        if param.ndim == rank:
            return param
        if param.ndim == 0:
            return param.reshape((1,) * rank)
        return param.reshape([-1 if i == axis else 1 for i in range(rank)])
    out = quantized_data.astype(np.float32)
    if zero_point is not None:
        out = out - along_axis(zero_point).astype(np.float32)
    return (out * along_axis(scale)).astype(scale.dtype)


def cast(source_val, output_dtype):
    """iOS16/iOS18 ``constexpr_cast``: fp16 weights given as fp32."""
    if str(output_dtype) != "fp32":
        raise ValueError(f"constexpr_cast to {output_dtype} (the op casts to fp32 only)")
    return source_val.astype(np.float32)


# op type -> (the decompression for the op's inputs as the program binds them).
CONSTEXPR = {
    "constexpr_blockwise_shift_scale": blockwise_shift_scale,
    "constexpr_lut_to_dense": lambda indices, lut, vector_axis=None, shape=None: (
        lut_to_dense_ios16(lut, indices, shape) if shape is not None else lut_to_dense(indices, lut, vector_axis)),
    "constexpr_affine_dequantize": affine_dequantize,
    "constexpr_cast": cast,
}
