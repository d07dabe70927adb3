"""A reference interpreter for Core ML programs: the MIL functions of an ``.mlpackage`` run on the
CPU with numpy, so the bytes we ship can be checked where Core ML cannot run (Linux).

Loading reads each function's ops from the package's protobuf (``coreml_program._load_spec``)
and their constants, the weights in ``weights/weight.bin`` included, with coremltools' own
value reader (``coremltools.converters.mil.frontend.milproto.load._load_value`` and its
``TranscriptionContext``, private in coremltools 9.0: what its ``milproto`` loader reads a
program with; if they move, follow them there). Every ``constexpr_*`` op is decompressed
then, once per program: functions of a multifunction program that bind the same stored
weight share one decompressed copy (``coreml_constexpr``). An op type the interpreter does
not know stops the load with one error naming it and its function: nothing is skipped.

Arithmetic: every op is computed in fp32 (``coreml_ops``) and its output rounded to the
dtype the program declares for it (round to nearest even for fp16). That is our model of
the Neural Engine's fp16 arithmetic: fp16 storage of every intermediate tensor, fp32 inside
an op (accumulation included). Apple does not document the Neural Engine's accumulator;
a device may round a long sum more often, or fuse ops and round less often. The model is
exact for data movement and for ops whose result is one rounding of an exact value, and
differs from a device by the rounding inside ops, as two CPU kernels do
(``tests/float_bounds.py`` bounds such differences). An fp32 program is computed in fp32.

fp16 values are carried as float32 arrays holding fp16 values (numpy has no fast fp16
matmul); a function's fp16 inputs may come as float16 arrays, and its fp16 outputs are
given as float16.
"""

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ane_build.programs import coreml_constexpr, coreml_program
from ane_build.programs.coreml_ops import OPS
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
FP16 = "float16"
TORCH_FROM = 4096  # elements from which fp16 conversions go through torch
# MIL dtype -> the numpy dtype its values are carried in.
CARRIERS = {FP16: np.float32, "float32": np.float32, "float64": np.float64, "int32": np.int32,
            "int64": np.int64, "int16": np.int16, "uint16": np.uint16, "int8": np.int8, "uint8": np.uint8,
            "bool": np.bool_}


@dataclass(frozen=True)
class Step:
    """One run-time op, bound to the names of its inputs."""

    type: str
    name: str
    compute: object  # coreml_ops.Op
    inputs: tuple  # (argument, name or [names])
    outputs: tuple  # of coreml_program.Tensor


class Function:
    """One MIL function, ready to call: ``function({input name: array})`` -> {output name: array}."""

    def __init__(self, name, inputs, outputs, constants, steps, where):
        self.name, self.inputs, self.outputs = name, inputs, outputs
        self.constants, self.steps, self.where = constants, steps, where
        self.dtypes = {t.name: t.dtype for t in inputs}
        self.dtypes.update((t.name, t.dtype) for step in steps for t in step.outputs)

    def __call__(self, feeds):
        missing = [t.name for t in self.inputs if t.name not in feeds]
        if missing:
            raise UserError(self.where, f"function {self.name}: no value for its input {missing[0]}")
        # An fp16 overflow is inf, as on the device; NaNs show in the results.
        with np.errstate(all="ignore"), _one_thread():
            env = dict(self.constants)
            env.update((t.name, _input(feeds[t.name], t)) for t in self.inputs)
            for step in self.steps:
                self._run(step, env)
            return {name: _output(env[name], self.dtypes.get(name)) for name in self.outputs}

    def _run(self, step, env):
        op = step.compute
        args = {arg: [env[n] for n in ref] if isinstance(ref, list) else env[ref] for arg, ref in step.inputs}
        try:
            result = op.compute([t.shape for t in step.outputs], **args) if op.wants_shape else op.compute(**args)
        except (ValueError, IndexError, TypeError, NotImplementedError) as e:
            raise UserError(self.where, f"function {self.name}: op {step.type} {step.name!r} fails on its "
                                        f"inputs ({type(e).__name__}: {e})") from None
        results = result if isinstance(result, tuple) else (result,)
        for tensor, value in zip(step.outputs, results):
            value = np.asarray(value) if op.moves else _round(value, tensor.dtype)
            if value.shape != tensor.shape and not _fits(value.shape, tensor.shape):
                raise UserError(self.where, f"function {self.name}: op {step.type} {step.name!r} gives shape "
                                            f"{list(value.shape)} where the program declares {list(tensor.shape)}")
            env[tensor.name] = value


class Program:
    """The functions of one Core ML package, sharing their decompressed weights."""

    def __init__(self, functions, where):
        self.functions, self.where = functions, where

    def function(self, name):
        if name not in self.functions:
            raise UserError(self.where, f"no Core ML function {name!r} (it has {', '.join(sorted(self.functions))})")
        return self.functions[name]


@functools.lru_cache(maxsize=1)
def _blas_threads():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@contextlib.contextmanager
def _one_thread():
    """BLAS and torch (its fp16 conversions) on one thread while a function runs: the same sums in
    the same order on any machine, and no threads fighting for a busy machine's cores. On two
    cores another job kept busy, two BLAS threads made SmolLM2-135M's prefill 7x slower, and
    two torch threads a cache's fp16 conversion 300x (7 ms instead of 22 us)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas_threads().limit(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


def _fits(shape, declared):
    """Whether ``shape`` is what ``declared`` says, an open axis (None) fitting any size."""
    return len(shape) == len(declared) and all(d is None or d == s for s, d in zip(shape, declared))


def _round(value, dtype):
    """An op's output as the program stores it: fp16 rounded to nearest even (carried in fp32),
    others in their type. Large arrays round through torch, whose fp16 conversions are ~10x numpy's."""
    if dtype == FP16:
        value = np.asarray(value, np.float32)
        if value.size < TORCH_FROM:
            return value.astype(np.float16).astype(np.float32)
        return _torch(value).half().float().numpy()
    carrier = CARRIERS.get(dtype)
    return np.asarray(value) if carrier is None else np.asarray(value).astype(carrier, copy=False)


def _torch(array):
    import torch

    return torch.from_numpy(array if array.flags.c_contiguous else np.ascontiguousarray(array))


def _input(value, tensor):
    """A function input as ops take it: fp16 values (float16 or not) carried in fp32."""
    value = np.asarray(value)
    if tensor.dtype == FP16 and value.dtype == np.float16:
        return _torch(value).float().numpy()
    return _round(value, tensor.dtype)


def _output(value, dtype):
    return _torch(value).half().numpy() if dtype == FP16 and value.size >= TORCH_FROM else \
        value.astype(np.float16) if dtype == FP16 else value


def load(package, where=None):
    """The Program in one ``.mlpackage`` folder; ``where`` names it in errors (default: its path)."""
    from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext

    package = Path(package)
    where = where or str(package)
    spec = coreml_program._load_spec(package)
    if spec.WhichOneof("Type") != "mlProgram":
        raise UserError(where, f"not an ML program (a {spec.WhichOneof('Type')} model)")
    reader = _Values(TranscriptionContext(str(package / "Data" / "com.apple.CoreML" / "weights")), where)
    with _one_thread():
        functions = {name: _function(name, fn, reader, where) for name, fn in sorted(spec.mlProgram.functions.items())}
    log.info("loaded %s: %s", where, ", ".join(f"{n} ({len(f.steps)} ops)" for n, f in functions.items()))
    return Program(functions, where)


class _Values:
    """Constants read and decompressed once per package, keyed by where they are stored: two
    functions' ops over one stored weight get one array."""

    def __init__(self, context, where):
        self.context, self.where = context, where
        self.cache = {}  # key -> raw value (its stored numpy dtype)
        self.carried = {}  # (key, dtype) -> the value as ops take it

    def raw(self, value_spec):
        """(key, value) of a MIL Value: an array in its stored dtype, or a string."""
        from coremltools.converters.mil.frontend.milproto.load import _load_value

        if value_spec.WhichOneof("value") == "blobFileValue":
            blob = value_spec.blobFileValue
            key = ("blob", blob.fileName, blob.offset)
            if key not in self.cache:
                self.cache[key] = np.asarray(_load_value(self.context, value_spec))
            return key, self.cache[key]
        value = _load_value(self.context, value_spec)
        value = value if isinstance(value, str) else np.asarray(value)
        return ("value", _fingerprint(value)), value

    def decompressed(self, op_type, inputs, compute):
        """(key, value) of a constexpr op over the (key, value) ``inputs`` {argument: ...}."""
        key = (op_type, tuple(sorted((arg, k) for arg, (k, _) in inputs.items())))
        if key not in self.cache:
            self.cache[key] = np.asarray(compute(**{arg: v for arg, (_, v) in inputs.items()}))
        return key, self.cache[key]

    def carried_as(self, key, value, dtype):
        if (key, dtype) not in self.carried:
            self.carried[key, dtype] = value if isinstance(value, str) else _round(value, dtype)
        return self.carried[key, dtype]


def _fingerprint(value):
    if isinstance(value, str):
        return value
    return value.dtype.str, value.shape, value.tobytes()


def _function(name, fn, reader, where):
    """A Function from a MIL function's protobuf: constants resolved, run-time ops bound."""
    block = fn.block_specializations[fn.opset]
    inputs = tuple(coreml_program._tensor(v.name, v.type) for v in fn.inputs)
    raw, constants, steps = {}, {}, []  # raw: name -> (key, value) of constants, for constexpr ops
    for number, op in enumerate(block.operations):
        outputs = tuple(coreml_program._tensor(v.name, v.type) for v in op.outputs)
        op_name = op.attributes["name"].immediateValue.tensor.strings.values[0] if "name" in op.attributes else ""
        op_name = op_name or (outputs[0].name if outputs else op.type)
        if op.blocks:
            raise _unknown(where, name, op.type, op_name, "an op with nested blocks (control flow)")
        bindings = _bindings(op, number, raw, reader)
        if op.type == "const":
            raw[outputs[0].name] = reader.raw(op.attributes["val"])
        elif op.type.startswith("constexpr_"):
            raw[outputs[0].name] = _constexpr(op.type, op_name, bindings, raw, reader, (where, name))
        elif op.type in OPS:
            steps.append(_step(op.type, op_name, bindings, outputs))
            # Its inline values, as ops take them (a constexpr's stay raw: they are its weight's bytes).
            constants.update((n, reader.carried_as(*raw[n], dtype)) for n, dtype in _inline(op, number))
            continue
        else:
            raise _unknown(where, name, op.type, op_name)
        key, value = raw[outputs[0].name]
        constants[outputs[0].name] = reader.carried_as(key, value, outputs[0].dtype)
    return Function(name, inputs, tuple(block.outputs), constants, steps, where)


def _bindings(op, number, raw, reader):
    """{argument: [name, ...]} of the ``number``-th op; its inline values are read into ``raw``
    under names of their own (``_inline``)."""
    bindings = {}
    for arg, value in op.inputs.items():
        names = []
        for i, binding in enumerate(value.arguments):
            if binding.WhichOneof("binding") == "name":
                names.append(binding.name)
                continue
            names.append(_inline_name(op, number, arg, i))
            raw[names[-1]] = reader.raw(binding.value)
        bindings[arg] = names
    return bindings


def _inline_name(op, number, arg, i):
    return f"{op.type}:{number}:{arg}:{i}"  # no value name has a colon


def _inline(op, number):
    """(name, dtype) of the ``number``-th op's inline values."""
    return [(_inline_name(op, number, arg, i), coreml_program._tensor("", binding.value.type).dtype)
            for arg, value in op.inputs.items() for i, binding in enumerate(value.arguments)
            if binding.WhichOneof("binding") == "value"]


def _constexpr(op_type, op_name, bindings, raw, reader, where_function):
    where, function = where_function
    compute = coreml_constexpr.CONSTEXPR.get(op_type)
    if compute is None:
        raise _unknown(where, function, op_type, op_name)
    try:
        inputs = {arg: raw[names[0]] for arg, names in bindings.items()}
    except KeyError as e:
        raise UserError(where, f"function {function}: {op_type} {op_name!r} reads {e}, which is not a constant") \
            from None
    try:
        return reader.decompressed(op_type, inputs, compute)
    except (ValueError, IndexError) as e:
        raise UserError(where, f"function {function}: {op_type} {op_name!r}: {e}") from None


def _step(op_type, op_name, bindings, outputs):
    compute = OPS[op_type]
    inputs = tuple((arg, names if arg in compute.tuples or len(names) > 1 else names[0])
                   for arg, names in bindings.items())
    return Step(op_type, op_name, compute, inputs, outputs)


def _unknown(where, function, op_type, op_name, what=None):
    what = what or "an op type the Core ML interpreter does not implement (ane_build/programs/coreml_ops.py)"
    return UserError(where, f"function {function}: op {op_type} ({op_name!r}) is {what}: the program cannot be "
                            "run on Linux until it does")
