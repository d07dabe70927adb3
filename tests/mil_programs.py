"""Tiny Core ML programs built straight from MIL (seconds each, no ExecuTorch export): for every lint
rule, one that breaks it and one that comes as close as it can without breaking it.

``save(name, folder)`` converts the program ``PROGRAMS[name]`` builds into ``folder/<name>.mlpackage``.
"""

import numpy as np

FP16 = "float16"


def _mil():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    return ct, mb, types


def _program(shapes, body, dtypes=None):
    """A one-function iOS18 program over inputs of ``shapes`` (fp16 unless ``dtypes`` says otherwise)."""
    ct, mb, types = _mil()
    dtypes = dtypes or [types.fp16] * len(shapes)
    specs = [mb.TensorSpec(shape=shape, dtype=dtype) for shape, dtype in zip(shapes, dtypes)]
    return mb.program(input_specs=specs, opset_version=ct.target.iOS18)(body)


def _relu(shape):
    """A program that is one relu over an fp16 input of ``shape``: where the shape is the point."""
    _, mb, _ = _mil()
    return _program([shape], lambda x: mb.relu(x=x))


def save(name, folder, precision=None):
    """``PROGRAMS[name]`` as ``folder/<name>.mlpackage``, converted as the export stage converts (fp16, iOS18)."""
    ct, _, _ = _mil()
    built = PROGRAMS[name]()
    program, precision = built if isinstance(built, tuple) else (built, precision)
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=precision or ct.precision.FLOAT16, skip_model_load=True)
    path = folder / f"{name}.mlpackage"
    model.save(str(path))
    return path


def rank5():
    _, mb, _ = _mil()
    return _program([(2, 3, 4, 64)], lambda x: mb.reshape(x=mb.relu(x=mb.reshape(x=x, shape=[2, 3, 4, 2, 32])),
                                                          shape=[2, 3, 4, 64]))


def rank4():
    _, mb, _ = _mil()
    return _program([(2, 3, 4, 64)], lambda x: mb.reshape(x=mb.relu(x=mb.reshape(x=x, shape=[6, 4, 2, 32])),
                                                          shape=[2, 3, 4, 64]))


def fp32_softmax():
    """An fp16 program but for one softmax kept in fp32 (an op Core ML's fp16 pass was told to skip)."""
    ct, mb, types = _mil()
    program = _program([(4, 64)], lambda x: mb.softmax(x=mb.add(x=x, y=1.0), axis=-1), [types.fp32])
    return program, ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type != "softmax")


def fp16_softmax():
    _, mb, _ = _mil()
    return _program([(4, 64)], lambda x: mb.softmax(x=mb.add(x=x, y=np.float16(1)), axis=-1))


def int_positions():
    """Position arithmetic on an int32 input, whose result scales an activation."""
    _, mb, types = _mil()
    return _program([(1, 64), (1, 64)], lambda x, pos: mb.mul(x=x, y=mb.cast(x=mb.add(x=pos, y=1), dtype="fp16")),
                    [types.fp16, types.int32])


def const_ints():
    """Integers only as constants (a reshape's shape)."""
    _, mb, _ = _mil()
    return _program([(1, 64)], lambda x: mb.reshape(x=mb.relu(x=x), shape=[2, 32]))


def static_dim():
    return _relu((1, 64))


def open_dim():
    from coremltools.converters.mil.mil import get_new_symbol

    return _relu((1, get_new_symbol()))


def runtime_slice():
    _, mb, types = _mil()
    return _program([(4, 64), (2,)], lambda x, begin: mb.slice_by_size(x=x, begin=begin, size=[2, 64]),
                    [types.fp16, types.int32])


def const_slice():
    _, mb, _ = _mil()
    return _program([(4, 64)], lambda x: mb.slice_by_size(x=x, begin=[1, 0], size=[2, 64]))


def wide_70000():
    return _relu((1, 70000))


def channels_65536():
    """65536 on the channel axis, 32 on the last: at the limits, within them."""
    return _relu((1, 65536, 1, 32))


def logits_70016():
    """Upstream's calling convention at a vocabulary past 65536 (Llama 3's 128256): a function taking the
    mask (``attn_mask``) whose logits are one row of the vocabulary's width, joined by a final reshape."""
    _, mb, _ = _mil()

    def body(attn_mask, x):
        return mb.reshape(x=mb.add(x=x, y=mb.reduce_sum(x=attn_mask)), shape=[1, 70016])
    return _program([(1, 64), (1, 547, 128)], body)


def wide_16385():
    return _relu((1, 16385))


def wide_16384():
    return _relu((1, 16384))


def channels_20000():
    return _relu((1, 20000, 1, 32))


def row_gather():
    """A row of an activation picked at a run-time index: what an LLM's last-token selection does."""
    _, mb, types = _mil()
    return _program([(8, 64), (1,)], lambda x, i: mb.gather(x=mb.relu(x=x), indices=i, axis=0),
                    [types.fp16, types.int32])


def const_gather():
    _, mb, _ = _mil()
    return _program([(8, 64)], lambda x: mb.gather(x=mb.relu(x=x), indices=np.array([7], np.int32), axis=0))


def embedding():
    """A token-embedding lookup (index arithmetic on the token ids, a constant table), then fp16 work."""
    _, mb, types = _mil()
    table = np.random.default_rng(0).standard_normal((512, 64)).astype(np.float16)

    def body(tokens, x):
        rows = mb.gather(x=table, indices=mb.add(x=tokens, y=np.int32(1)), axis=0)
        return mb.add(x=mb.relu(x=x), y=rows)
    return _program([(1, 64), (1, 64)], body, [types.int32, types.fp16])


def scatter():
    _, mb, _ = _mil()
    return _program([(8, 64), (1, 64)], lambda x, u: mb.scatter(data=x, indices=np.array([3], np.int32), updates=u))


def slice_update():
    _, mb, _ = _mil()
    return _program([(8, 64), (1, 64)], lambda x, u: mb.slice_update(x=x, update=u, begin=[3, 0], end=[4, 64]))


def topk():
    _, mb, _ = _mil()
    return _program([(4, 64)], lambda x: mb.topk(x=x, k=2, axis=0)[0])


def reduce_max():
    _, mb, _ = _mil()
    return _program([(4, 64)], lambda x: mb.reduce_max(x=x, axes=[0], keep_dims=True))


def lstm():
    _, mb, _ = _mil()
    rng = np.random.default_rng(0)
    w_ih, w_hh = (rng.standard_normal((4 * 32, n)).astype(np.float16) for n in (64, 32))
    zeros = np.zeros((1, 32), np.float16)
    return _program([(4, 1, 64)], lambda x: mb.lstm(x=x, initial_h=zeros, initial_c=zeros, weight_ih=w_ih,
                                                    weight_hh=w_hh)[0])


def linear():
    _, mb, _ = _mil()
    weight = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float16)
    return _program([(1, 64)], lambda x: mb.linear(x=x, weight=weight))


def cumsum():
    _, mb, _ = _mil()
    return _program([(4, 64)], lambda x: mb.cumsum(x=x, axis=0))


def reduce_sum():
    _, mb, _ = _mil()
    return _program([(4, 64)], lambda x: mb.reduce_sum(x=x, axes=[0], keep_dims=True))


def state():
    """A KV cache kept as Core ML state and read in the graph."""
    ct, mb, types = _mil()

    @mb.program(input_specs=[mb.TensorSpec((1, 64), dtype=types.fp16),
                             mb.StateTensorSpec((1, 64), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(x, cache):
        return mb.add(x=x, y=mb.read_state(input=cache))
    return program


def cache_io():
    """The same cache as an input, as our models keep it."""
    _, mb, _ = _mil()
    return _program([(1, 64), (1, 64)], lambda x, cache: mb.add(x=x, y=cache))


def sdpa():
    _, mb, _ = _mil()
    return _program([(1, 2, 8, 64)] * 3, lambda q, k, v: mb.scaled_dot_product_attention(query=q, key=k, value=v))


def attention():
    """The same attention written out, as our models write it."""
    _, mb, _ = _mil()

    def body(q, k, v):
        scores = mb.matmul(x=q, y=k, transpose_y=True)
        return mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)
    return _program([(1, 2, 8, 64)] * 3, body)


def row_48():
    """48 fp16 values: 96 bytes, a multiple of 32 but not of the 64 the Neural Engine pads to."""
    return _relu((1, 48))


def row_32_fp32():
    """32 fp32 elements: 128 bytes, aligned (and an fp32 program, which is fp32's business, not alignment's)."""
    ct, mb, types = _mil()
    return _program([(1, 32)], lambda x: mb.relu(x=x), [types.fp32]), ct.precision.FLOAT32


def _quantized_linear(scale_shape):
    _, mb, types = _mil()
    rng = np.random.default_rng(0)
    data = rng.integers(-8, 8, (64, 64)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, scale_shape).astype(np.float16)
    return _program([(1, 64)], lambda x: mb.linear(x=x, weight=mb.constexpr_blockwise_shift_scale(data=data,
                                                                                               scale=scale)))


def per_block_scales():
    return _quantized_linear((64, 2))  # a scale per 32 inputs of each output channel


def per_channel_scales():
    return _quantized_linear((64, 1))


def _palettized_linear(bits):
    _, mb, types = _mil()
    rng = np.random.default_rng(0)
    dtype = {3: types.np_uint3_dtype, 4: types.np_uint4_dtype}[bits]
    indices = rng.integers(0, 2 ** bits, (64, 64)).astype(dtype)
    lut = rng.standard_normal((1, 1, 2 ** bits, 1)).astype(np.float16)
    return _program([(1, 64)], lambda x: mb.linear(x=x, weight=mb.constexpr_lut_to_dense(indices=indices, lut=lut)))


def palette_3bit():
    return _palettized_linear(3)


def palette_4bit():
    return _palettized_linear(4)


PROGRAMS = {build.__name__: build for build in (
    rank5, rank4, fp32_softmax, fp16_softmax, int_positions, const_ints, open_dim, static_dim, runtime_slice, const_slice, wide_70000,
    logits_70016,    channels_65536, wide_16385, wide_16384, channels_20000, row_gather, const_gather, embedding, scatter,
    slice_update, topk, reduce_max, lstm, linear, cumsum, reduce_sum, state, cache_io, sdpa, attention, row_48,
    row_32_fp32, per_block_scales, per_channel_scales, palette_3bit, palette_4bit)}
