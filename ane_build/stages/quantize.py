"""quantize: rewrite entry + recipe ``quantize:`` -> ``torch.export`` programs with quantized weights.

Weights are quantized with torchao as the seed export does (weight-only; symmetric unless
``quantize.mapping`` asks for a zero point too; the Core ML converter turns torchao's
``dequantize_affine`` into its constexpr ops). One program per method: ``forward.pt2``
(seq_length tokens) and, when ``ane.decode_method`` is set, ``decode.pt2`` (one token). The
entry carries ``spec.json`` (with a ``quantize`` section added) and the tokenizer forward, so
the export stage reads only this entry.
"""

import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from ane_build import saved_programs
from ane_build.errors import UserError
from ane_build.model import io

log = logging.getLogger(__name__)
LINEAR_KINDS = ("none", "c4w", "b4w")
MAPPINGS = ("symmetric", "asymmetric")
FLOAT_BITS = {"fp16": 16, "fp32": 32}


def resolve(params):
    """The ``quantize:`` settings checked, with the embedding spec parsed to {"bits", "group"} or None."""
    linear = params.get("linear", "c4w")
    if linear not in LINEAR_KINDS:
        raise UserError("", f"quantize.linear={linear!r}: expected one of {', '.join(LINEAR_KINDS)}")
    group_size = params.get("group_size", 32)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UserError("", f"quantize.group_size={group_size!r}: expected a positive integer")
    mapping = params.get("mapping", "symmetric")
    if mapping not in MAPPINGS:
        raise UserError("", f"quantize.mapping={mapping!r}: expected one of {', '.join(MAPPINGS)}")
    return {"linear": linear, "group_size": group_size, "mapping": mapping,
            "embedding": _embedding_spec(params.get("embedding"))}


def _embedding_spec(text):
    if text is None:
        return None
    bits, _, group = str(text).partition(",")
    if not (bits in ("4", "8") and group.isdigit()):
        raise UserError("", f"quantize.embedding={text!r}: expected 'bits,group' with bits 4 or 8 and "
                            "group a whole number (0 = one scale per row), e.g. '4,32'")
    return {"bits": int(bits), "group": int(group)}


def quantized_model(rewrite_entry, params):
    """The rewrite entry's model with its weights quantized as ``params`` asks, ready to export."""
    return quantize(io.load_model(rewrite_entry), resolve(params))


def quantize(model, settings):
    """Quantize ``model`` in place as the resolved ``settings`` ask; returns it ready to export."""
    from torchao.utils import unwrap_tensor_subclass

    _check_divisible(model, settings)
    _quantize(model, settings)
    # torch.export cannot trace torchao's tensor subclasses; this turns them into plain
    # tensors and an explicit dequantize_affine in the graph.
    return unwrap_tensor_subclass(model)


def _check_divisible(model, settings):
    """Every group must tile its rows: torchao would fail deep inside otherwise."""
    if settings["linear"] == "b4w":
        group = settings["group_size"]
        linears = {name: m.in_features for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        for name, in_features in linears.items():
            if in_features % group:
                common = math.gcd(*linears.values())
                raise UserError("", f"quantize.group_size={group} does not divide layer {name} "
                                    f"(in_features={in_features}); b4w needs a group size dividing every "
                                    f"linear's in_features, i.e. a divisor of {common}")
    if settings["embedding"] and settings["embedding"]["group"]:
        group, dim = settings["embedding"]["group"], model.tok_embeddings.embedding_dim
        if dim % group:
            raise UserError("", f"quantize.embedding group {group} does not divide the embedding "
                                f"width {dim}; use a divisor of {dim}, or 0 for one scale per row")


def _quantize(model, settings):
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import (
        IntxWeightOnlyConfig,
        MappingType,
        quantize_,
    )

    if settings["embedding"]:
        bits, group = settings["embedding"]["bits"], settings["embedding"]["group"]
        config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"),
                                      granularity=PerGroup(group) if group else PerAxis(0))
        quantize_(model, config, lambda m, fqn: isinstance(m, nn.Embedding))
    if settings["linear"] != "none":
        granularity = PerGroup(settings["group_size"]) if settings["linear"] == "b4w" else PerAxis(0)
        # quantize_'s default filter takes every nn.Linear: the split chunks and the LM head too.
        mapping = MappingType[settings["mapping"].upper()]
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=granularity, mapping_type=mapping))


def weight_groups(model, settings, dtype):
    """{group: {"params": count, "bits": bits per weight}} for linear, embedding and other weights."""
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    float_bits = FLOAT_BITS[dtype]
    bits = {
        "linear": 4 if settings["linear"] != "none" else float_bits,
        "embedding": settings["embedding"]["bits"] if settings["embedding"] else float_bits,
        "other": float_bits,
    }
    groups = {name: {"params": 0, "bits": b} for name, b in bits.items()}
    for name, p in model.named_parameters():
        group = "linear" if name in linears else "embedding" if name in embeddings else "other"
        groups[group]["params"] += p.numel()
    return groups


def ideal_bytes(groups):
    """The size of the weights alone at their bit widths (no scales, no container)."""
    return sum(g["params"] * g["bits"] // 8 for g in groups.values())


def run(inputs, params, out_dir):
    """inputs: {"rewrite": rewrite entry dir}; params: the recipe's ``quantize:`` mapping."""
    rewrite_dir, out_dir = Path(inputs["rewrite"]), Path(out_dir)
    spec = io.read_spec(rewrite_dir)
    settings = resolve(params)
    model = io.load_model(rewrite_dir)
    groups = weight_groups(model, settings, spec["ane"]["dtype"])
    model = quantize(model, settings)

    metrics = {"ideal_bytes": ideal_bytes(groups)}
    programs = {}
    for method, seq_length in io.methods(spec["ane"]).items():
        log.info("exporting %s (%d tokens per call)", method, seq_length)
        started = time.time()
        # Non-strict: it traces with real Python instead of dynamo, seconds instead of minutes
        # on a real model, and gives the same graph for this plain static-shape module.
        program = torch.export.export(model, io.example_inputs(spec, seq_length), strict=False)
        programs[method] = {"file": f"{method}.pt2", "seq_length": seq_length}
        saved_programs.save(program, out_dir / programs[method]["file"])
        metrics[f"{method}_export_seconds"] = round(time.time() - started, 2)

    io.copy_tokenizer(spec["tokenizer"], rewrite_dir, out_dir)
    quantize_section = {**settings, "weight_groups": groups, "ideal_bytes": metrics["ideal_bytes"]}
    io.write_spec({**spec, "quantize": quantize_section, "programs": programs}, out_dir)
    return metrics
