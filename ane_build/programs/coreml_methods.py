"""A ``.pte``'s Core ML methods run through the reference interpreter (``coreml_interpreter``), as
ExecuTorch's Core ML backend runs them on a device, without Core ML.

A method of our programs is one or more Core ML delegate calls. Each call's arguments are the
method's values: first the Core ML model's inputs, in the order of the payload's
``metadata.json`` names, then its outputs in that file's order (``coreml_preprocess``'s
``inputNames`` / ``outputNames``, per method for a multifunction payload). A multifunction
payload's delegate says which function it calls (its ``CMJR`` reference's ``functionName``);
a single-function payload's is the program's ``main``. Each payload is loaded once, however
many methods call it, so the prefill and decode functions share their weights.

A method that runs anything but Core ML delegate calls (a CPU kernel between two partitions)
is refused in one error: only the Core ML program is interpreted here.
"""

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ane_build.programs import coreml_interpreter, coreml_program
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
MAIN_FUNCTION = "main"
HEADER_BYTES = 64  # enough for a .pte's file identifier and extended header


def delegates_to_coreml(path):
    """Whether the .pte at ``path`` has Core ML delegates: its program (not its data segments)
    names the Core ML backend. A quick look, before anything is deserialized."""
    from executorch.exir._serialize._program import _ExtendedHeader

    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        if head[4:6] != coreml_program.PTE_MAGIC:
            return False  # not a .pte: whoever opens it says so
        try:
            header = _ExtendedHeader.from_bytes(head[8:])
        except ValueError:  # too short for one: no program either
            return False
        f.seek(0)
        # Without an extended header the file is the program, with no segments after it.
        return coreml_program.COREML_BACKEND.encode() in f.read(header.program_size if header.is_valid() else -1)


@dataclass(frozen=True)
class Call:
    function: object  # coreml_interpreter.Function
    inputs: tuple  # the function's input names, in the delegate's argument order
    outputs: tuple  # its output names, likewise
    args: tuple  # the method's value indices: inputs, then outputs


@dataclass(frozen=True)
class Method:
    inputs: tuple  # value indices of the method's inputs
    outputs: tuple  # value indices of its outputs
    calls: tuple  # of Call, in order


class CoreMLMethods:
    """``run(method, [input arrays])`` -> [output arrays] for every method that delegates to Core ML."""

    def __init__(self, path):
        self.path = Path(path)
        pte = coreml_program._deserialize(self.path.read_bytes(), self.path)
        named = {}
        if pte.named_data is not None:
            named = {key: pte.named_data.buffers[e.buffer_index] for key, e in pte.named_data.pte_data.items()}
        payloads = {}  # key -> (coreml_interpreter.Program, metadata.json)
        with tempfile.TemporaryDirectory(prefix="ane-build-coreml-") as scratch:
            self.methods = {plan.name: self._method(plan, pte.program, named, payloads, Path(scratch))
                            for plan in pte.program.execution_plan if plan.delegates}

    def run(self, method, inputs):
        plan = self.methods[method]
        values = dict(zip(plan.inputs, inputs))
        for call in plan.calls:
            n = len(call.inputs)
            missing = [i for i in call.args[:n] if i not in values]
            if missing:
                raise UserError(str(self.path), f"method {method}: a Core ML call reads values {missing}, which "
                                                "no input or earlier call gives")
            results = call.function({name: values[i] for name, i in zip(call.inputs, call.args[:n])})
            values.update((i, results[name]) for name, i in zip(call.outputs, call.args[n:]))
        return [values[i] for i in plan.outputs]

    def _method(self, plan, program, named, payloads, scratch):
        from executorch.exir.schema import DelegateCall

        calls = []
        for chain in plan.chains:
            for instruction in chain.instructions:
                args = instruction.instr_args
                if not isinstance(args, DelegateCall):
                    raise UserError(str(self.path), f"method {plan.name} runs {type(args).__name__} "
                                                     "outside Core ML: the interpreter runs only methods that are "
                                                     "Core ML delegate calls alone")
                calls.append(self._call(plan, plan.delegates[args.delegate_index], args.args, program, named,
                                        payloads, scratch))
        return Method(tuple(plan.inputs), tuple(plan.outputs), tuple(calls))

    def _call(self, plan, delegate, args, program, named, payloads, scratch):
        if delegate.id != coreml_program.COREML_BACKEND:
            raise UserError(str(self.path), f"method {plan.name} calls {delegate.id}: only Core ML delegates are "
                                             "interpreted")
        key, payload, function = _reference(program, delegate, named, self.path, f"{plan.name}.{len(payloads)}")
        if key not in payloads:
            package = coreml_program._unflatten(payload, scratch / f"p{len(payloads)}", self.path)
            where = f"{self.path} (Core ML payload {len(payloads) + 1})"
            payloads[key] = (coreml_interpreter.load(package, where),
                             json.loads((package.parent / "metadata.json").read_text()))
        interpreted, metadata = payloads[key]
        names = metadata["methods"][function] if "methods" in metadata else metadata
        if len(args) != len(names["inputNames"]) + len(names["outputNames"]):
            raise UserError(str(self.path), f"method {plan.name}: a Core ML call has {len(args)} arguments for "
                                             f"{len(names['inputNames'])} inputs and {len(names['outputNames'])} "
                                             "outputs")
        return Call(interpreted.function(function), tuple(names["inputNames"]), tuple(names["outputNames"]),
                    tuple(args))


def _reference(program, delegate, named, path, fallback_key):
    """(key, payload bytes, function name) of one Core ML delegate."""
    key, payload = coreml_program._payload(program, delegate, named, path, fallback_key)
    raw = program.backend_delegate_data[delegate.processed.index].data
    if raw.startswith(coreml_program.JSON_REFERENCE):
        return key, payload, json.loads(raw[len(coreml_program.JSON_REFERENCE):].decode())["functionName"]
    return key, payload, MAIN_FUNCTION
