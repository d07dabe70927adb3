"""Core ML programs read without Core ML: a ``.pte``'s Core ML payloads, or an ``.mlpackage``, as MIL ops.

An ExecuTorch ``.pte`` keeps each Core ML partition as a flattened ``.mlpackage`` (inline,
or, for a multifunction program whose methods share weights, in the named data its
delegates point at with a ``CMJR`` JSON reference). ExecuTorch's own C++ helper unflattens
one into a folder, and coremltools reads the package's MIL program (ops, dtypes, shapes)
without Core ML. Only the facts the lint needs are kept: no weights are loaded.
"""

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ane_build.util.errors import UserError

COREML_BACKEND = "CoreMLBackend"
JSON_REFERENCE = b"CMJR"  # ExecuTorch's Core ML backend: "this payload is in the named data under key"
PTE_MAGIC = b"ET"  # a .pte is a flatbuffer whose file identifier (bytes 4-8) is ET<version>
CONSTANT_OPS = ("const",)  # and every constexpr_*: resolved when the model loads, not per call


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # MIL's data type in lower case: float16, float32, int32, bool...
    shape: tuple  # one entry per axis: its size, or None when the program leaves it open
    state: bool = False  # an MLState input (Core ML keeps it between calls)


@dataclass(frozen=True, eq=False)  # an op is itself: two identical-looking ops are still two
class Op:
    type: str
    name: str
    inputs: dict  # argument -> tuple of what is bound to it: a value's name, or an inline value's Tensor
    outputs: tuple  # of Tensor


@dataclass
class Function:
    name: str
    model: str  # the package's label in the report
    inputs: tuple  # of Tensor
    outputs: tuple  # names of the values it returns
    ops: list  # every op, nested blocks included, in program order
    tensors: dict = field(default_factory=dict)  # name -> Tensor, inputs and op outputs
    producers: dict = field(default_factory=dict)  # name -> the Op that computes it
    consumers: dict = field(default_factory=dict)  # name -> [Ops that read it]

    def __post_init__(self):
        self.tensors.update((t.name, t) for t in self.inputs)
        for op in self.ops:
            for out in op.outputs:
                self.tensors[out.name] = out
                self.producers[out.name] = op
            for name in _bound_names(op):
                self.consumers.setdefault(name, []).append(op)

    def value(self, binding):
        """The Tensor an op's input is bound to (None if the program does not say)."""
        return binding if isinstance(binding, Tensor) else self.tensors.get(binding)

    def is_constant(self, binding):
        """Whether a bound value is known when the model loads: inline, a const, or a constexpr of consts."""
        op = None if isinstance(binding, Tensor) else self.producers.get(binding)
        return isinstance(binding, Tensor) or (op is not None and is_constant_op(op))


@dataclass
class Model:
    label: str  # which partition of the program: its methods, or the package's name
    functions: list
    weight_bytes: int


def is_constant_op(op):
    return op.type in CONSTANT_OPS or op.type.startswith("constexpr_")


def _bound_names(op):
    return [b for bindings in op.inputs.values() for b in bindings if isinstance(b, str)]


def read(path):
    """[Model] of the Core ML program(s) in ``path`` (a .pte or an .mlpackage); UserError if it has none."""
    with packages(path) as found:
        return [read_package(package, label) for package, label in found]


@contextlib.contextmanager
def packages(path):
    """Yield [(mlpackage path, label)] for ``path``: itself, or each Core ML payload of a .pte
    unflattened into a temporary folder (deleted on leaving)."""
    path = Path(path)
    if not path.exists():
        raise UserError(str(path), "no such file or folder")
    if path.is_dir():
        yield [(path, path.name)]
        return
    payloads = coreml_payloads(path)
    with tempfile.TemporaryDirectory(prefix="ane-build-lint-") as scratch:
        yield [(_unflatten(payload, Path(scratch) / f"p{i}", path), label)
               for i, (label, payload) in enumerate(payloads)]


def coreml_payloads(path):
    """[(label, flattened .mlpackage bytes)] of a .pte's Core ML delegates, each payload once.

    A multifunction payload serves several methods (several delegates point at one key);
    its label names them all.
    """
    data = Path(path).read_bytes()
    if data[4:6] != PTE_MAGIC:
        raise UserError(str(path), "not an ExecuTorch program (.pte) or a Core ML package (.mlpackage)")
    pte = _deserialize(data, path)
    named = {}
    if pte.named_data is not None:
        named = {key: pte.named_data.buffers[entry.buffer_index] for key, entry in pte.named_data.pte_data.items()}
    found, methods, backends = {}, {}, set()
    for plan in pte.program.execution_plan:
        for number, delegate in enumerate(plan.delegates):
            backends.add(delegate.id)
            if delegate.id != COREML_BACKEND:
                continue
            key, payload = _payload(pte.program, delegate, named, path, f"{plan.name}.{number}")
            found.setdefault(key, payload)
            methods.setdefault(key, []).append(plan.name)
    if not found:
        inside = f"its delegates: {', '.join(sorted(backends))}" if backends else "it has no delegates"
        raise UserError(str(path), f"no Core ML program inside ({inside})")
    return [(f"partition {i + 1} ({', '.join(methods[key])})", payload)
            for i, (key, payload) in enumerate(found.items())]


def _deserialize(data, path):
    from executorch.exir._serialize._program import deserialize_pte_binary

    try:
        return deserialize_pte_binary(data)
    except Exception as e:  # noqa: BLE001 - whatever the flatbuffer reader trips on, the file is bad
        raise UserError(str(path), f"not a readable ExecuTorch program ({type(e).__name__}: {e})") from None


def _payload(program, delegate, named, path, fallback_key):
    """(key, bytes) of one Core ML delegate: inline bytes, or the named data they refer to."""
    from executorch.exir.schema import DataLocation

    if delegate.processed.location != DataLocation.INLINE:
        raise UserError(str(path), "a Core ML delegate's data is outside the program (a segment); "
                                   "expected it inline, as ExecuTorch's Core ML backend writes it")
    raw = program.backend_delegate_data[delegate.processed.index].data
    if not raw.startswith(JSON_REFERENCE):
        return fallback_key, raw
    key = json.loads(raw[len(JSON_REFERENCE):].decode())["key"]
    if key not in named:
        raise UserError(str(path), f"a Core ML delegate refers to named data {key!r}, which the program lacks")
    return key, named[key]


def _unflatten(payload, folder, path):
    """The .mlpackage inside one flattened payload, written under ``folder``."""
    from executorch.backends.apple.coreml import executorchcoreml

    folder.mkdir()
    found = executorchcoreml.unflatten_directory_contents(payload, str(folder)) and sorted(folder.rglob("*.mlpackage"))
    if not found:
        raise UserError(str(path), "a Core ML delegate's data is not a flattened .mlpackage")
    return found[0]


def read_package(package, label):
    """The Model in one .mlpackage folder."""
    spec = _load_spec(package)
    if spec.WhichOneof("Type") != "mlProgram":
        raise UserError(str(package), f"not an ML program (a {spec.WhichOneof('Type')} model): "
                                      "the lint reads MIL programs, which ExecuTorch's Core ML backend writes")
    functions = [_function(name, fn, label) for name, fn in sorted(spec.mlProgram.functions.items())]
    weights = Path(package) / "Data" / "com.apple.CoreML" / "weights"
    weight_bytes = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0
    return Model(label, functions, weight_bytes)


def _load_spec(package):
    import coremltools as ct

    try:
        return ct.utils.load_spec(str(package))
    except Exception as e:  # noqa: BLE001 - a missing manifest, a corrupt protobuf...: the package is bad
        raise UserError(str(package), f"cannot read its Core ML model ({type(e).__name__}: {e})") from None


def _function(name, fn, label):
    block = fn.block_specializations[fn.opset]
    return Function(name, label, tuple(_tensor(v.name, v.type) for v in fn.inputs), tuple(block.outputs),
                    list(_ops(block)))


def _ops(block):
    for op in block.operations:
        outputs = tuple(_tensor(v.name, v.type) for v in op.outputs)
        inputs = {arg: tuple(b.name if b.WhichOneof("binding") == "name" else _tensor("", b.value.type)
                             for b in value.arguments) for arg, value in op.inputs.items()}
        name = op.attributes["name"].immediateValue.tensor.strings.values[0] if "name" in op.attributes else ""
        yield Op(op.type, name or (outputs[0].name if outputs else op.type), inputs, outputs)
        for nested in op.blocks:
            yield from _ops(nested)


def _tensor(name, value_type):
    """A Tensor for a MIL ValueType; a state's is the tensor it wraps, lists and the like have no shape."""
    from coremltools.proto import MIL_pb2

    kind = value_type.WhichOneof("type")
    state = kind == "stateType"
    if state:
        value_type, kind = value_type.stateType.wrappedType, "tensorType"
    if kind != "tensorType":
        return Tensor(name, kind, ())
    t = value_type.tensorType
    shape = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in t.dimensions)
    shape += (None,) * (t.rank - len(shape))  # axes the program does not describe at all
    return Tensor(name, MIL_pb2.DataType.Name(t.dataType).lower(), shape, state)
