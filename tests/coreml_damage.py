"""Damage to a ``.pte``'s Core ML payload of the kinds a conversion bug does: a constexpr's scales
changed, a palette's entries out of order, an op's attribute flipped.

Each is made in place, as bytes of the same length at the one place they occur in the file, so
everything else, the constant methods and the tensors a runner reads included, is what the export
wrote. The payload's weight.bin and model.mlmodel are stored whole inside the .pte (a flattened
folder), and our payloads' protobuf is written deterministically (programs/reproducible_coreml.py),
so a constant's bytes and an op's serialized bytes are found as they are.
"""

import contextlib
import shutil

import numpy as np

from ane_build.programs import coreml_program

WEIGHTS = "Data/com.apple.CoreML/weights"


@contextlib.contextmanager
def _payload(pte):
    """(the Core ML program's spec, a reader of its constants) of the .pte's one payload."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext, _load_value

    with coreml_program.packages(pte) as found:
        (package, _), = found
        context = TranscriptionContext(str(package / WEIGHTS))
        yield ct.utils.load_spec(str(package)), lambda value: np.asarray(_load_value(context, value))


def _ops(spec, function):
    fn = spec.mlProgram.functions[function]
    return list(fn.block_specializations[fn.opset].operations)


def _producer(ops, name):
    return next(op for op in ops if any(out.name == name for out in op.outputs))


def _value(ops, op, argument):
    """The MIL Value bound to an op's argument: inline, or a const op's."""
    binding = op.inputs[argument].arguments[0]
    return binding.value if binding.WhichOneof("binding") == "value" else \
        _producer(ops, binding.name).attributes["val"]


def _replace(pte, out, old, new, within=b""):
    """Write ``pte`` with ``old`` replaced by ``new`` as ``out``: the one place ``old`` occurs (inside
    the one place ``within`` occurs, when given)."""
    data = pte.read_bytes()
    start = data.find(within) if within else 0
    assert data.count(within) == 1 if within else True, "the container is not in the file once"
    region = data[start:start + len(within)] if within else data
    assert len(old) == len(new) and old != new and region.count(old) == 1, "not one place of the same length"
    at = start + region.find(old)
    out.write_bytes(data[:at] + new + data[at + len(old):])
    return out


def copy_entry(entry, folder):
    """A copy of an export entry, to damage its model.pte."""
    return shutil.copytree(entry, folder)


def scales_changed(pte, out, function="forward", which=-1, change=lambda scale: -scale):
    """``out``: ``pte`` with the scales of the ``which``-th constexpr_blockwise_shift_scale of
    ``function`` changed by ``change`` (default: negated, a sign lost). A multifunction program
    stores a weight once: every function reading it reads the damage."""
    with _payload(pte) as (spec, read):
        ops = _ops(spec, function)
        constexpr = [op for op in ops if op.type == "constexpr_blockwise_shift_scale"][which]
        scale = read(_value(ops, constexpr, "scale"))
    return _replace(pte, out, scale.tobytes(), change(scale).astype(scale.dtype).tobytes())


def palettes_reversed(pte, out, function="forward", which=-1):
    """``out``: ``pte`` with the palettes of the ``which``-th constexpr_lut_to_dense of ``function``
    in reverse order (each index now picks another entry: an index bit-order bug)."""
    with _payload(pte) as (spec, read):
        ops = _ops(spec, function)
        constexpr = [op for op in ops if op.type == "constexpr_lut_to_dense"][which]
        lut = read(_value(ops, constexpr, "lut"))
    return _replace(pte, out, lut.tobytes(), np.flip(lut, axis=-2).tobytes())


def attribute_flipped(pte, out, function, op_type, argument, square=True):
    """``out``: ``pte`` with the boolean ``argument`` of the first ``op_type`` op of ``function`` whose
    weight (its y) is square, negated; e.g. a matmul's transpose_y: a weight read untransposed."""
    with _payload(pte) as (spec, _):
        ops = _ops(spec, function)

        def weight_shape(op):
            weight = _producer(ops, op.inputs["y"].arguments[0].name)
            return [d.constant.size for d in weight.outputs[0].type.tensorType.dimensions]
        op = next(op for op in ops if op.type == op_type and (not square or len(set(weight_shape(op))) == 1))
        const = _producer(ops, op.inputs[argument].arguments[0].name)
        before = const.SerializeToString(deterministic=True)
        # The functions of a multifunction program each hold such a constant: the damage is this one's.
        where = spec.mlProgram.functions[function].SerializeToString(deterministic=True)
        values = const.attributes["val"].immediateValue.tensor.bools.values
        values[0] = not values[0]
        after = const.SerializeToString(deterministic=True)
    return _replace(pte, out, before, after, within=where)
