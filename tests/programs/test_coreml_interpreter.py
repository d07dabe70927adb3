"""The Core ML interpreter, op by op, against coremltools' own definitions of each op.

Each case is a one-op MIL program (its tensors the function's inputs, its parameters constants)
saved as an .mlpackage without any conversion pass, then run by the interpreter. The reference is
the same op with every input a constant, whose value coremltools' ``value_inference`` computes,
in fp32 from the same fp16 values and then rounded to fp16: the interpreter's stated model
(each op in fp32, its output rounded to the program's dtype). The constexpr ops are checked
against their ``decompress`` in coremltools, to the bit.
"""

import numpy as np
import pytest

from ane_build.programs import coreml_constexpr, coreml_interpreter
from ane_build.programs.coreml_ops import OPS
from ane_build.util.errors import UserError
from tests import mil_programs

RNG = np.random.default_rng(0)
FP16, FP32 = np.float16, np.float32


def mil():
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    return ct, mb, types


def values(shape, low=-2.0, high=2.0, dtype=FP16):
    return RNG.uniform(low, high, shape).astype(dtype)


def ints(shape, low, high):
    return RNG.integers(low, high, shape).astype(np.int32)


def save(program, folder, name="op"):
    """``program`` as ``folder/<name>.mlpackage``, its ops as built (no conversion pass)."""
    ct, _, _ = mil()
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    path = folder / f"{name}.mlpackage"
    model.save(str(path))
    return path


def interpreted(op_type, tensors, params, folder):
    """The op's output(s) as the interpreter computes them from a saved one-op program."""
    ct, mb, types = mil()
    dtypes = {np.dtype(FP16): types.fp16, np.dtype(FP32): types.fp32, np.dtype(np.int32): types.int32,
              np.dtype(bool): types.bool}
    from coremltools.converters.mil.mil import Function, Program

    names = list(tensors)
    placeholders = {n: mb.placeholder(shape=tensors[n].shape, dtype=dtypes[tensors[n].dtype]) for n in names}
    program = Program()
    with Function(placeholders, opset_version=ct.target.iOS18) as body:
        bound = dict(body.inputs)
        if op_type in ("concat", "stack"):  # a tuple of tensors
            bound = {"values": [bound[n] for n in names]}
        out = getattr(mb, op_type)(**bound, **params)
        body.set_outputs(list(out) if isinstance(out, (list, tuple)) else [out])
    program.add_function("main", body)

    function = coreml_interpreter.load(save(program, folder)).function("main")
    out = function({n: tensors[n] for n in names})
    return [out[name] for name in function.outputs]


def reference(op_type, tensors, params):
    """The op's output(s) by coremltools' value_inference, from fp32 copies of fp16 tensors, rounded
    back to each output's dtype as the program declares it."""
    ct, mb, types = mil()

    def widened(value):
        return value.astype(FP32) if getattr(value, "dtype", None) == FP16 else value
    given, wide = dict(tensors), {n: widened(t) for n, t in tensors.items()}
    if op_type in ("concat", "stack"):
        given, wide = {"values": list(given.values())}, {"values": list(wide.values())}
    wide_params = {n: widened(p) for n, p in params.items()}
    if op_type in DEFINED:
        return [DEFINED[op_type](**wide, **wide_params).astype(FP16)]
    found = {}

    def outputs(out):
        return out if isinstance(out, (list, tuple)) else [out]

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS18)
    def program(unused):
        found["vals"] = [np.asarray(v.val) for v in outputs(getattr(mb, op_type)(**wide, **wide_params))]
        found["fp16"] = [v.dtype == types.fp16 for v in outputs(getattr(mb, op_type)(**given, **params))]
        return unused
    return [v.astype(FP16) if half else v for v, half in zip(found["vals"], found["fp16"])]


# Ops coremltools gives no value_inference: their definition, as its docs state it.
DEFINED = {"silu": lambda x: x * (1 / (1 + np.exp(-x)))}  # iOS15 activation.silu: x * sigmoid(x)

# (op, {tensor inputs}, {constant parameters}): every op type in coreml_ops.OPS at least once.
CASES = [
    *[(op, {"x": values((2, 3, 8)), "y": values((3, 8))}, {})
      for op in ("add", "sub", "mul", "minimum", "maximum", "greater_equal", "equal", "not_equal", "less",
                 "less_equal", "greater")],
    ("real_div", {"x": values((2, 8)), "y": values((2, 8), 0.5, 2)}, {}),
    ("pow", {"x": values((2, 8), 0.1, 2)}, {"y": FP16(2.0)}),
    ("floor_div", {"x": ints((2, 8), -20, 20), "y": ints((2, 8), 1, 5)}, {}),
    ("mod", {"x": ints((2, 8), 0, 20), "y": ints((2, 8), 1, 5)}, {}),
    ("add", {"x": ints((4,), -9, 9)}, {"y": np.int32(96)}),
    ("minimum", {"x": ints((1,), 0, 200)}, {"y": np.int32(95)}),
    ("logical_and", {"x": ints((8,), 0, 2).astype(bool), "y": ints((8,), 0, 2).astype(bool)}, {}),
    ("logical_or", {"x": ints((8,), 0, 2).astype(bool), "y": ints((8,), 0, 2).astype(bool)}, {}),
    ("logical_not", {"x": ints((8,), 0, 2).astype(bool)}, {}),
    *[(op, {"x": values((2, 16))}, {}) for op in ("abs", "exp", "square", "sin", "cos", "tanh", "floor", "ceil",
                                                  "silu", "sigmoid", "relu")],
    ("sqrt", {"x": values((2, 16), 0.01, 4)}, {}),
    ("rsqrt", {"x": values((2, 16), 0.01, 4)}, {}),
    ("rsqrt", {"x": values((2, 16), 0.01, 4)}, {"epsilon": FP16(0.5)}),
    ("inverse", {"x": values((2, 16), 0.01, 4)}, {}),  # its default epsilon, 1e-4, is added
    ("inverse", {"x": values((2, 16), 0.01, 4)}, {"epsilon": FP16(0.25)}),
    ("clip", {"x": values((2, 16))}, {"alpha": FP16(-0.5), "beta": FP16(0.75)}),
    ("select", {"cond": ints((2, 8), 0, 2).astype(bool), "a": values((2, 8)), "b": values((2, 8))}, {}),
    ("cast", {"x": values((2, 8), -50, 50)}, {"dtype": "int32"}),
    ("cast", {"x": ints((2, 8), -3000, 3000)}, {"dtype": "fp16"}),
    ("cast", {"x": ints((4,), -70000, 70000)}, {"dtype": "int16"}),
    ("cast", {"x": ints((4,), 0, 1000)}, {"dtype": "uint16"}),
    ("cast", {"x": values((2, 8))}, {"dtype": "fp32"}),
    *[(op, {"x": values((2, 3, 64))}, {"axes": axes, "keep_dims": keep})
      for op in ("reduce_max", "reduce_min", "reduce_mean", "reduce_sum")
      for axes, keep in (([-1], True), ([0, 2], False))],
    ("softmax", {"x": values((2, 3, 65), -8, 8)}, {"axis": -1}),
    ("softmax", {"x": values((4, 8))}, {"axis": 0}),
    ("matmul", {"x": values((1, 5, 64), -1, 1)}, {"y": values((48, 64), -1, 1), "transpose_y": True}),
    ("matmul", {"x": values((3, 4, 16), -1, 1), "y": values((3, 16, 40), -1, 1)}, {}),
    ("matmul", {"x": values((3, 16, 4), -1, 1), "y": values((3, 40, 16), -1, 1)},
     {"transpose_x": True, "transpose_y": True}),
    ("linear", {"x": values((1, 3, 64), -1, 1)}, {"weight": values((24, 64), -1, 1), "bias": values((24,))}),
    ("linear", {"x": values((4, 64), -1, 1)}, {"weight": values((24, 64), -1, 1)}),
    ("gather", {"x": values((96, 16)), "indices": ints((1, 3), 0, 96)}, {"axis": 0}),
    ("gather", {"x": values((4, 12))}, {"indices": np.array([11, 0, 5], np.int32), "axis": 1}),
    ("concat", {"a": values((2, 3, 4)), "b": values((2, 3, 1))}, {"axis": -1}),
    ("stack", {"a": values((1, 16)), "b": values((1, 16))}, {"axis": -1}),
    ("reshape", {"x": values((2, 3, 8))}, {"shape": np.array([2, -1, 4], np.int32)}),
    ("expand_dims", {"x": values((3, 8))}, {"axes": [0, -1]}),
    ("squeeze", {"x": values((1, 3, 1, 8))}, {"axes": [0]}),
    ("squeeze", {"x": values((1, 3, 1, 8))}, {}),
    ("transpose", {"x": values((1, 2, 3, 4))}, {"perm": [0, 2, 1, 3]}),
    ("tile", {"x": values((1, 65))}, {"reps": [3, 1]}),
    ("slice_by_index", {"x": values((1, 4, 16, 2))},  # what a select of the last axis converts into
     {"begin": [0, 0, 0, 1], "end": [1, 4, 16, 2], "end_mask": [True, True, True, False],
      "squeeze_mask": [False, False, False, True]}),
    ("slice_by_index", {"x": values((6, 10))}, {"begin": [1, -8], "end": [5, 9], "stride": [2, 3],
                                                 "begin_mask": [False, False], "end_mask": [False, True]}),
    ("slice_by_size", {"x": values((6, 10))}, {"begin": [1, 2], "size": [3, -1]}),
    ("split", {"x": values((6, 10))}, {"num_splits": 2, "axis": 1}),
    ("split", {"x": values((6, 10))}, {"split_sizes": [1, 5], "axis": 0}),
]


def test_every_op_has_a_case():
    assert set(OPS) <= {op for op, _, _ in CASES}


@pytest.mark.parametrize("op_type, tensors, params", CASES, ids=[c[0] for c in CASES])
def test_an_op_computes_what_coremltools_defines(op_type, tensors, params, tmp_path):
    got = interpreted(op_type, tensors, params, tmp_path)
    want = reference(op_type, tensors, params)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        # Core ML gives no bool or 16-bit integer outputs: the converter casts them for the function's.
        assert g.shape == w.shape and (g.dtype == w.dtype or w.dtype in (bool, np.int16, np.uint16))
        if g.dtype == FP16:
            # One fp16 rounding of an fp32 result: the same, or one unit apart where an fp32 sum in
            # another order lands on the other side of a rounding boundary.
            np.testing.assert_allclose(g.astype(FP32), w.astype(FP32), rtol=2 ** -10, atol=2 ** -24)
        else:
            np.testing.assert_array_equal(g, w)


def test_concat_interleaves_as_documented(tmp_path):
    """coremltools' value_inference of concat ignores ``interleave``; its docs' example is the reference."""
    one, two = np.array([[1, 2], [3, 4], [5, 6]], FP16), np.array([[7, 8], [9, 10], [11, 12]], FP16)
    got, = interpreted("concat", {"a": one, "b": two}, {"axis": 0, "interleave": True}, tmp_path)
    assert got.tolist() == [[1, 2], [7, 8], [3, 4], [9, 10], [5, 6], [11, 12]]


def test_an_fp32_program_computes_in_fp32(tmp_path):
    x, w = values((2, 64), -1, 1, FP32), values((16, 64), -1, 1, FP32)
    got, = interpreted("linear", {"x": x}, {"weight": w}, tmp_path)
    assert got.dtype == FP32
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-6, atol=1e-6)


def test_fp16_outputs_are_rounded_once_per_op(tmp_path):
    """1/3 + 1/3 in fp16 is the fp16 sum of two fp16 thirds, not an fp32 2/3 rounded."""
    third = np.full((1, 4), 1 / 3, FP16)
    got, = interpreted("add", {"x": third, "y": third}, {}, tmp_path)
    assert got.dtype == FP16 and (got == third + third).all()


# --- constexpr ops: the decompressed weights, to the bit ----------------------------------------

def blockwise_cases():
    from coremltools.converters.mil.mil import types

    int8 = RNG.integers(-128, 128, (8, 64)).astype(np.int8)
    uint4 = RNG.integers(0, 16, (8, 64)).astype(types.np_uint4_dtype)
    return [
        (int8, values((8, 1), 0.001, 0.1), None),  # c8w symmetric: a scale per output channel
        (int8, values((8, 1), 0.001, 0.1), RNG.integers(-20, 20, (8, 1)).astype(np.int8)),  # c8w asymmetric
        (int8, values((8, 2), 0.001, 0.1), None),  # a scale per block of 32
        (uint4, values((8, 2), 0.001, 0.1), values((8, 2), 0, 15)),  # Q4_1 kept: fp16 offsets per block
        (int8, values((8, 2), 0.001, 0.1, FP32), values((8, 2), -8, 8, FP32)),  # fp32 scales and offsets
    ]


@pytest.mark.parametrize("case", range(5))
def test_blockwise_shift_scale_is_coremltools_decompress(case):
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale

    data, scale, offset = blockwise_cases()[case]
    got = coreml_constexpr.blockwise_shift_scale(data, scale, offset)
    want = constexpr_blockwise_shift_scale.decompress(data, scale, offset)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("lut_shape, vector_axis", [((1, 1, 16, 1), None), ((4, 1, 16, 1), None),
                                                     ((2, 4, 16, 1), None), ((2, 1, 16, 2), 0),
                                                     ((1, 2, 16, 4), 1)])
def test_lut_to_dense_is_coremltools_decompress(lut_shape, vector_axis):
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_lut_to_dense

    indices = RNG.integers(0, 16, (8, 32)).astype(types.np_uint4_dtype)
    lut = values(lut_shape)
    got = coreml_constexpr.lut_to_dense(indices, lut, vector_axis)
    want = constexpr_lut_to_dense.decompress(indices, lut, None if vector_axis is None else np.int32(vector_axis))
    assert got.shape == want.shape and got.tobytes() == want.tobytes()


def test_ios16_constexprs_are_coremltools_decompress():
    from coremltools.converters.mil.mil.ops.defs.iOS16 import constexpr_ops
    from coremltools.optimize import _utils

    quantized = RNG.integers(0, 256, (6, 10)).astype(np.uint8)
    scale, zero = values((6,), 0.01, 0.1), RNG.integers(100, 150, (6,)).astype(np.uint8)
    got = coreml_constexpr.affine_dequantize(quantized, zero, scale, 0)
    want = constexpr_ops.constexpr_affine_dequantize.decompress(quantized, zero, scale, 0)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    lut, flat = values((4,)), RNG.integers(0, 4, 60).astype(np.uint8)
    packed = _utils.pack_elements_into_bits(flat, 2)
    want = constexpr_ops.constexpr_lut_to_dense.decompress(lut, packed, np.array([6, 10], np.uint32))
    unpacked = _utils.restore_elements_from_packed_bits(packed, 2, 60)
    assert coreml_constexpr.lut_to_dense_ios16(lut, unpacked, [6, 10]).tobytes() == want.tobytes()
    assert coreml_constexpr.cast(values((3,)), "fp32").dtype == FP32


@pytest.mark.parametrize("name", ["per_block_scales", "per_channel_scales", "palette_4bit", "palette_3bit"])
def test_a_quantized_linear_reads_its_weight_from_the_blob_file(name, tmp_path):
    """mil_programs' quantized linears, converted as the export converts (weights in weight.bin):
    the interpreter's output is the linear of coremltools' own decompressed weight."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    package = mil_programs.save(name, tmp_path)
    spec = ct.utils.load_spec(str(package))
    program = load(spec, spec.specificationVersion, str(package / "Data/com.apple.CoreML/weights"))
    (constexpr,) = [op for op in program.functions["main"].operations if op.op_type.startswith("constexpr_")]
    weight = constexpr.materialized_val_inference().astype(FP32)
    function = coreml_interpreter.load(package).function("main")
    x = values((1, 64))
    (got,) = function({"x": x}).values()
    np.testing.assert_allclose(got.astype(FP32), (x.astype(FP32) @ weight.T).astype(FP16).astype(FP32),
                               rtol=2 ** -10, atol=2 ** -24)


# --- programs: functions, shared weights, and what the interpreter refuses -------------------

def test_an_op_it_does_not_know_is_one_error_naming_it_and_its_function(tmp_path):
    package = mil_programs.save("cumsum", tmp_path)
    with pytest.raises(UserError) as error:
        coreml_interpreter.load(package, "model.pte (payload 1)")
    message = str(error.value)
    assert message.startswith("model.pte (payload 1): function main: op cumsum ('cumsum_0') is an op type the "
                              "Core ML interpreter does not implement") and "\n" not in message


def test_functions_of_a_multifunction_program_share_their_weights(tmp_path):
    """Two functions over one weight (as a prefill and a one-token forward method are) decompress it once."""
    ct, mb, types = mil()
    rng = np.random.default_rng(1)
    data, scale = rng.integers(-128, 128, (32, 64)).astype(np.int8), values((32, 1), 0.01, 0.1)

    def linear(tokens):
        @mb.program(input_specs=[mb.TensorSpec((tokens, 64), dtype=types.fp16)], opset_version=ct.target.iOS18)
        def program(x):
            return mb.linear(x=x, weight=mb.constexpr_blockwise_shift_scale(data=data, scale=scale))
        return program
    paths = {name: save(linear(tokens), tmp_path, name) for name, tokens in (("prefill", 8), ("forward", 1))}
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, path in paths.items():
        descriptor.add_function(str(path), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = "prefill"
    ct.utils.save_multifunction(descriptor, str(tmp_path / "both.mlpackage"))

    program = coreml_interpreter.load(tmp_path / "both.mlpackage")
    prefill, forward = program.function("prefill"), program.function("forward")
    shared = [v for v in prefill.constants.values() if getattr(v, "dtype", None) == FP32 and v.shape == (32, 64)]
    assert len(shared) == 1 and any(v is shared[0] for v in forward.constants.values())
    x = values((8, 64))
    (full,), (one,) = prefill({"x": x}).values(), forward({"x": x[3:4]}).values()
    assert (one == full[3:4]).all()
    with pytest.raises(UserError, match="no Core ML function 'decode' \\(it has forward, prefill\\)"):
        program.function("decode")


def test_a_missing_input_is_named(tmp_path):
    function = coreml_interpreter.load(mil_programs.save("static_dim", tmp_path)).function("main")
    with pytest.raises(UserError, match="function main: no value for its input x"):
        function({})
