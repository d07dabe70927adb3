"""A palettized fp16 model lowered to Core ML as the export stage lowers it, and the look-up ops the
converter wrote: how tests see what Core ML receives (no Linux runtime can run it)."""

import torch


def lowered_luts(model, columns, monkeypatch):
    """(the delegation report, the ``constexpr_lut_to_dense`` ops) of ``model`` (a torchao-unwrapped
    fp16 module of one [2, columns] input) lowered through the export stage's Core ML path."""
    from executorch.backends.apple.coreml.compiler import CoreMLBackend

    from ane_build.stages import export

    converted = []
    convert = CoreMLBackend._convert_to_mlmodel

    def spy(*args, **kwargs):
        converted.append(convert(*args, **kwargs))
        return converted[-1]

    monkeypatch.setattr(CoreMLBackend, "_convert_to_mlmodel", staticmethod(spy))
    program = torch.export.export(model, (torch.randn(2, columns, dtype=torch.float16),), strict=False)
    settings = {"minimum_deployment_target": "iOS18", "compute_unit": "CPU_AND_NE", "max_payload_mb": 1000}
    report = export.delegation_report(export.lower_coreml({"forward": program}, settings, "fp16", {}, seed="test"))
    ops = converted[0]._mil_program.functions["main"].operations
    return report, [op for op in ops if op.op_type == "constexpr_lut_to_dense"]
