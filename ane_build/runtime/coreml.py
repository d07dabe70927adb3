"""A Core ML ``.pte`` run where no Core ML backend is: its Core ML program through the reference
interpreter (``programs.coreml_interpreter``), behind the runner's program interface (``info``,
``methods``, ``run``), so that a machine without a Mac reads what the shipped program writes.

Slow next to a device (numpy on the CPU, one op at a time), and meant to be: it checks the
bytes, it does not serve. Shapes, context and ids come from the ``.pte`` as for ``PteProgram``
(its methods' metadata and constant methods, which ExecuTorch loads without the backend).
"""

import logging
from pathlib import Path

import torch

from ane_build.model.ane_llama import logit_rows
from ane_build.programs import coreml_methods
from ane_build.programs.coreml_program import COREML_BACKEND
from ane_build.runtime import program as pte
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)


class CoreMLProgram:
    """A ``.pte``'s Core ML methods, interpreted. The shape flags are ``PteProgram``'s."""

    interpreted = True  # its speeds are the interpreter's, not a device's

    def __init__(self, path, *, seq_length=None, max_seq_length=None, cache_size=None, dtype=None):
        self.path = Path(path)
        flags = {"seq_length": seq_length, "max_seq_length": max_seq_length, "cache_size": cache_size,
                 "dtype": dtype}
        program = pte._load_program(self.path)
        names = program.method_names
        if "forward" not in names:
            raise UserError(str(self.path), f"no forward method (it has {', '.join(sorted(names))})")
        metas = {name: program.metadata(name) for name in pte.METHODS if name in names}
        self.methods, self.rope, shapes = pte.read_shapes(self.path, program, metas)
        constants = {name: pte._constant(program, name) for name in pte.CONSTANTS if name in names}
        self.info = pte._model_info(self.path, shapes, constants, flags)
        self._coreml = coreml_methods.CoreMLMethods(self.path)
        log.info("interpreting %s's Core ML program: %s", self.path.name,
                 ", ".join(f"{m} {n} tokens/call" for m, n in self.methods.items()))

    def run(self, method, call):
        out = [torch.from_numpy(a) for a in self._coreml.run(method, [t.numpy() for t in call.flat])]
        if self.info.use_cache_list:
            n = self.info.n_layers
            return logit_rows(out[0]), out[1:1 + n], out[1 + n:]
        return logit_rows(out[0]), out[1], out[2]


def open_pte(path, **flags):
    """A ``.pte`` as the runner drives it: through ExecuTorch, or, for a Core ML program where this
    runtime has no Core ML backend (Linux), through the interpreter."""
    from executorch.runtime import Runtime

    registered = Runtime.get().backend_registry.registered_backend_names
    if COREML_BACKEND not in registered and Path(path).is_file() and coreml_methods.delegates_to_coreml(path):
        return CoreMLProgram(path, **flags)
    return pte.PteProgram(path, **flags)
