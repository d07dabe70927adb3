"""``torch.export.save`` / ``load`` of the quantize stage's programs: the same files and programs,
in less time.

- Saving checks that the program has a well-defined canonical form by building one (a deep copy
  of the whole serialized program, re-sorted) and throwing it away: the file written is the
  program as serialized, never that form: skipped (SmolLM2-135M's forward program: 3.0 s to
  save with torch's own, 1.2 s here, the same bytes; medians of 3, side by side).
- Loading asks ``typing.get_type_hints`` again for each of the ~170,000 objects it rebuilds:
  here each (class, namespace) is asked once (the same program: 2.8 s, 1.65 s here).
"""

import contextlib
import typing
import unittest.mock

import torch


def save(program, path):
    """Write ``program`` without the source lines its nodes were traced from: they name this
    checkout's folder, so the file (and the Core ML payload named after its bytes) would differ
    between two clones of one commit."""
    from torch._export.serde import serialize

    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("stack_trace", None)
    with unittest.mock.patch.object(serialize, "canonicalize", _unchecked):
        torch.export.save(program, path)


def load(path):
    # Register torch.ops.torchao.dequantize_affine and torch.ops.quant.dequantize_codebook,
    # which quantized and palettized graphs call.
    import torchao.prototype.quantization.codebook_coreml  # noqa: F401
    import torchao.quantization.quant_primitives  # noqa: F401

    with remembered_type_hints():
        return torch.export.load(path)


def _unchecked(program, constants=None):
    return program


@contextlib.contextmanager
def remembered_type_hints():
    """``typing.get_type_hints`` answering each (object, namespace) once. The namespaces are
    torch's schema modules, which a load does not change."""
    get_type_hints = typing.get_type_hints
    known = {}

    def remembered(obj, globalns=None, localns=None, include_extras=False):
        key = (obj, id(globalns), id(localns), include_extras)
        if key not in known:
            known[key] = get_type_hints(obj, globalns, localns, include_extras)
        return dict(known[key])

    with unittest.mock.patch.object(typing, "get_type_hints", remembered):
        yield
