"""Where Core ML itself plans each op of a program: ``MLComputePlan`` (macOS 14.4+, coremltools >= 8.1).

The plan is the host Mac's, for its Neural Engine generation and OS, with the compute units
the recipes use (CPU_AND_NE); it names the preferred device of every op that runs per call
(constants have none). coremltools 9.0 plans only a package's default function, so each
function of a multifunction package is planned as the ``main`` of a one-function copy (as
ExecuTorch's examples/apple/coreml/scripts/coreml_compute_plan.py does).
"""

import platform
import sys
import tempfile
from pathlib import Path

from ane_build.analysis.ane_rules import INPUT_LOOKUPS, Finding
from ane_build.programs import coreml_program
from ane_build.util.errors import UserError

MINIMUM_MACOS = (14, 4)


def require_mac():
    """UserError unless this host can compute a plan."""
    version = platform.mac_ver()[0] if sys.platform == "darwin" else ""
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if numbers < MINIMUM_MACOS:
        host = f"macOS {version}" if version else platform.system() or sys.platform
        raise UserError("--device-plan", f"needs macOS {'.'.join(map(str, MINIMUM_MACOS))}+ with Core ML "
                                         f"(MLComputePlan); this is {host}")


def findings(path, lookups):
    """A Finding for every op Core ML plans off the Neural Engine; ``lookups``: {(model label, function):
    output names of the allowlisted input-lookup ops}, whose findings are allowed."""
    found = []
    with coreml_program.packages(path) as packages, tempfile.TemporaryDirectory() as scratch:
        for number, (package, label) in enumerate(packages):
            model = coreml_program.read_package(package, label)
            for fn in model.functions:
                single = _one_function(package, fn.name, Path(scratch) / f"{number}-{fn.name}.mlpackage")
                allowed = lookups.get((label, fn.name), set())
                for op_type, outputs, device in _planned(single, Path(scratch) / f"{number}-{fn.name}.mlmodelc"):
                    if device != "NeuralEngine":
                        name = outputs[0] if outputs else op_type
                        tensors = tuple(fn.tensors[o] for o in outputs if o in fn.tensors)
                        covered = INPUT_LOOKUPS.id if allowed.intersection(outputs) else None
                        found.append(Finding("planned-off-ane", label, fn.name, op_type, name, tensors,
                                             f"planned on the {device}", covered))
    return found


def _one_function(package, function, dest):
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    descriptor = MultiFunctionDescriptor()
    descriptor.add_function(str(package), src_function_name=function, target_function_name="main")
    descriptor.default_function_name = "main"
    save_multifunction(descriptor, str(dest))
    return dest


def _planned(package, compiled_dest):
    """[(operator name, output names, preferred device)] of every planned op of the package's main."""
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    compiled = ct.models.utils.compile_model(str(package), destination_path=str(compiled_dest))
    plan = MLComputePlan.load_from_path(path=str(compiled), compute_units=ct.ComputeUnit.CPU_AND_NE)
    rows = []
    for fn in plan.model_structure.program.functions.values():
        for op in _operations(fn.block):
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            if usage is not None:
                rows.append((op.operator_name, [o.name for o in op.outputs], _device(usage.preferred_compute_device)))
    return rows


def _operations(block):
    for op in block.operations:
        yield op
        for nested in op.blocks or ():
            yield from _operations(nested)


def _device(device):
    from coremltools.models.compute_device import (
        MLCPUComputeDevice,
        MLGPUComputeDevice,
        MLNeuralEngineComputeDevice,
    )

    for kind, name in ((MLNeuralEngineComputeDevice, "NeuralEngine"), (MLGPUComputeDevice, "GPU"),
                       (MLCPUComputeDevice, "CPU")):
        if isinstance(device, kind):
            return name
    return type(device).__name__
