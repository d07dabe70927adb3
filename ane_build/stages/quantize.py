"""quantize: rewrite entry + recipe ``quantize:`` -> ``torch.export`` programs with quantized weights.

Weights are quantized with torchao as the seed export does (weight-only; symmetric unless
``quantize.mapping`` asks for a zero point too; the Core ML converter turns torchao's
``dequantize_affine`` into its constexpr ops). Each linear gets ``quantize.linear``'s kind
unless a ``quantize.overrides`` pattern names it (mixed precision: e.g. the LM head at 8 bits).
Kind ``source`` takes a GGUF checkpoint's own blocks as they are (``ane_build.quant.source_blocks``).
With a calibrate entry (``quantize.fit`` other than data-free, or ``quantize.budget_mb``), the
linears' codes are fitted with its statistics (``ane_build.quant.calibrated``), and under a budget
each linear's kind is chosen among ``quantize.candidates`` (``ane_build.quant.allocate``);
``allocation.json`` then says what each got and why.
One program per method (``io.methods``): ``forward.pt2`` and, when ``ane.decode_method`` is
set, ``prefill.pt2`` (``forward`` then takes one token). The entry carries ``spec.json`` (with
a ``quantize`` section added) and the tokenizer forward, so the export stage reads only this entry.
"""

import contextlib
import fnmatch
import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn

from ane_build import recipe
from ane_build.checkpoint import blocks as checkpoint_blocks
from ane_build.model import io
from ane_build.programs import saved_programs
from ane_build.quant import calibrated, calibration, mixed, palettize, source_blocks
from ane_build.util import worker
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
# {kind: bits per weight}. c4w/c8w: one scale (and zero point) per output channel, the form the
# Neural Engine runs; b4w: one per block of group_size inputs (Mac GPU; the ANE wants channels).
# source: the checkpoint's own blocks, each linear at its GGUF type's bits (source_blocks.group).
LINEAR_BITS = {"none": None, "c4w": 4, "b4w": 4, "c8w": 8, "lut4": 4, "lut6": 6, "source": None}
# lut4/lut6: a k-means palette of 16/64 values per palette_group output channels (palettize.py).
PALETTES = {"lut4": 4, "lut6": 6}
LINEAR_KINDS = tuple(LINEAR_BITS)
MAPPINGS = ("symmetric", "asymmetric")
# minmax spans each channel's range (the seed's); hqq picks the scale that minimises the error
# (torchao's half-quadratic solver, scale only: symmetric).
SCALES = ("minmax", "hqq")
FLOAT_BITS = {"fp16": 16, "fp32": 32}
# The kinds a calibrated fit quantizes (and a budget chooses among), and how (quant/calibrated.py).
FITTABLE = (*calibrated.GRID_BITS, *calibrated.PALETTE_BITS)
FITS = ("data-free", "fisher", "gptq")
ALLOCATION_FILE = "allocation.json"


def resolve(params):
    """The ``quantize:`` settings checked, with the embedding spec parsed to {"bits", "group"} or None."""
    linear = _kind(params.get("linear", "c4w"), "quantize.linear")
    group_size = params.get("group_size", 32)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise UserError("", f"quantize.group_size={group_size!r}: expected a positive integer")
    mapping = _choice(params.get("mapping", "symmetric"), MAPPINGS, "quantize.mapping")
    scales = _choice(params.get("scales", "minmax"), SCALES, "quantize.scales")
    if scales == "hqq" and mapping != "symmetric":
        raise UserError("", "quantize.scales=hqq: torchao's HQQ solver fits a scale only; it needs "
                            f"quantize.mapping=symmetric, got {mapping}")
    overrides = params.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError("", f"quantize.overrides={overrides!r}: expected a mapping of module pattern to kind")
    overrides = {str(pattern): _kind(kind, f"quantize.overrides.{pattern}") for pattern, kind in overrides.items()}
    candidates = params.get("candidates") or ["c8w", "lut6", "lut4"]
    for kind in candidates:
        _choice(kind, FITTABLE, "quantize.candidates")
    palette_group = params.get("palette_group", 16)
    if isinstance(palette_group, bool) or not isinstance(palette_group, int) or palette_group < 1:
        raise UserError("", f"quantize.palette_group={palette_group!r}: expected a positive integer")
    return {"linear": linear, "group_size": group_size, "palette_group": palette_group, "mapping": mapping,
            "scales": scales, "overrides": overrides, "embedding": _embedding_spec(params.get("embedding")),
            "fit": _choice(params.get("fit", "data-free"), FITS, "quantize.fit"), "budget_mb": params.get("budget_mb"),
            "candidates": list(candidates), "allocated": {}}


def _choice(value, choices, where):
    if value not in choices:
        raise UserError("", f"{where}={value!r}: expected one of {', '.join(choices)}")
    return value


def _kind(value, where):
    return _choice(value, LINEAR_KINDS, where)


def quantized_kinds(settings):
    """The kinds other than none that some linear may get, whatever the model."""
    return sorted(recipe.linear_kinds(settings) - {"none"})


def linear_kind(settings, name):
    """The kind a linear module ``name`` gets: the first override whose pattern matches it or a
    module holding it (``output`` takes ``output.chunks.3``; ``layers.0.*`` a whole layer), else
    ``quantize.linear``; under a budget, what the allocator chose for it (``settings["allocated"]``)."""
    if name in settings["allocated"]:
        return settings["allocated"][name]
    return _override(settings, name) or settings["linear"]


def _override(settings, name):
    """The kind of the first override whose pattern matches ``name`` or a module holding it, else None."""
    for pattern, kind in settings["overrides"].items():
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in _prefixes(name)):
            return kind
    return None


def _prefixes(name):
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _embedding_spec(text):
    if text is None:
        return None
    bits, _, group = str(text).partition(",")
    if not (bits in ("4", "8") and group.isdigit()):
        raise UserError("", f"quantize.embedding={text!r}: expected 'bits,group' with bits 4 or 8 and "
                            "group a whole number (0 = one scale per row), e.g. '4,32'")
    return {"bits": int(bits), "group": int(group)}


def quantized_model(rewrite_entry, params, calibrate_entry=None):
    """The rewrite entry's model with its weights quantized as ``params`` asks, ready to export;
    ``calibrate_entry``: the calibrate stage's entry of a recipe that has one (the stage's own fits)."""
    settings = resolve(params)
    model = io.load_model(rewrite_entry)
    stats = _statistics({"calibrate": calibrate_entry} if calibrate_entry else {})
    fitted, _ = fit_linears(model, settings, stats, io.read_spec(rewrite_entry)["ane"]["dtype"])
    return quantize(model, settings, _source(rewrite_entry, settings), fitted)


def _statistics(inputs):
    """The calibrate entry's statistics, or None where the recipe has no calibrate stage."""
    return calibration.load(Path(inputs["calibrate"]) / calibration.FILE) if "calibrate" in inputs else None


def _source(rewrite_entry, settings):
    """The checkpoint's blocks when some linear takes them as they are (kind source), else None."""
    return checkpoint_blocks.load(rewrite_entry) if "source" in quantized_kinds(settings) else None


def quantize(model, settings, source=None, fitted=None):
    """Quantize ``model`` in place as the resolved ``settings`` ask; returns it ready to export.
    ``source``: the rewrite entry's blocks (``checkpoint_blocks.load``), for kind source; ``fitted``:
    {linear name: ``calibrated.Fitted``} of the linears a calibrated fit quantized (``fit_linears``)."""
    from torchao.utils import unwrap_tensor_subclass

    _check_divisible(model, settings)
    _quantize(model, settings, source, fitted or {})
    # torch.export cannot trace torchao's tensor subclasses; this turns them into plain
    # tensors and an explicit dequantize_affine in the graph.
    return unwrap_tensor_subclass(model)


def _linears(model, settings):
    """{module name: (nn.Linear, its kind)} of every linear: the split chunks and the LM head too."""
    return {name: (m, linear_kind(settings, name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _check_divisible(model, settings):
    """Every group must tile its rows: torchao would fail deep inside otherwise."""
    linears = _linears(model, settings)
    group = settings["group_size"]
    for name, (m, kind) in linears.items():
        if kind == "b4w" and m.in_features % group:
            common = math.gcd(*(m.in_features for m, _ in linears.values()))
            raise UserError("", f"quantize.group_size={group} does not divide layer {name} "
                                f"(in_features={m.in_features}); b4w needs a group size dividing every "
                                f"linear's in_features, i.e. a divisor of {common}")
    rows = settings["palette_group"]
    for name, (m, kind) in linears.items():
        if kind in PALETTES and m.out_features % rows:
            raise UserError("", f"quantize.palette_group={rows} does not divide layer {name}'s "
                                f"{m.out_features} output channels; {kind} needs a divisor of every palettized "
                                "linear's out_features")
    if settings["embedding"] and settings["embedding"]["group"]:
        group, dim = settings["embedding"]["group"], model.tok_embeddings.embedding_dim
        if dim % group:
            raise UserError("", f"quantize.embedding group {group} does not divide the embedding "
                                f"width {dim}; use a divisor of {dim}, or 0 for one scale per row")


def _quantize(model, settings, source, fitted):
    from torchao.quantization.quant_api import quantize_

    if settings["embedding"]:
        quantize_(model, _embedding_config(settings["embedding"]), lambda m, fqn: isinstance(m, nn.Embedding))
    for name, codes in fitted.items():
        codes.apply(model.get_submodule(name), settings["palette_group"])
    kinds = {name: kind for name, (_, kind) in _linears(model, settings).items() if name not in fitted}
    for kind in set(kinds.values()) - {"none", "source", *PALETTES}:
        quantize_(model, _linear_config(kind, settings), lambda m, fqn, kind=kind: kinds.get(fqn) == kind)
    for kind in set(kinds.values()) & set(PALETTES):
        palettize.palettize_linears(model, PALETTES[kind], settings["palette_group"],
                                    lambda m, fqn, kind=kind: kinds.get(fqn) == kind)
    if "source" in kinds.values():
        source_blocks.quantize(model, [name for name, kind in kinds.items() if kind == "source"], source)


def fit_linears(model, settings, stats, dtype):
    """({linear name: ``calibrated.Fitted``}, the allocation report or None) of the linears fitted with
    the calibration ``stats``: under ``budget_mb`` every linear no override names, at the kind the
    allocator picks; the rest (all of them without a budget) at their own kind where it is fittable.
    Records the allocation in ``settings["allocated"]``."""
    if stats is None:
        if recipe.needs_calibration({"quantize": settings}):
            key = "fit" if settings["fit"] != "data-free" else "budget_mb"
            raise UserError(f"quantize.{key}", f"{settings[key]} reads the calibrate stage's statistics, and "
                                               "this run has none (the pipeline plans calibrate for it)")
        return {}, None
    linears = _linears(model, settings)
    free = [] if settings["budget_mb"] is None else [name for name in linears if _override(settings, name) is None]
    jobs = [(name, kind) for name, (_, kind) in linears.items() if name not in free and kind in FITTABLE]
    jobs += [(name, kind) for name in free for kind in settings["candidates"]]
    done = mixed.fit_all(jobs, {name: m for name, (m, _) in linears.items()}, settings, stats)
    fitted = {name: f for (name, _), f in zip(jobs, done) if name not in free}
    if not free:
        return fitted, None
    options = {name: [f for (n, _), f in zip(jobs, done) if n == name] for name in free}
    # Everything but the free linears (the embedding, norms, overridden linears) at its own bits.
    fixed = ideal_bytes(weight_groups(model, settings, dtype)) - \
        sum(_ideal_bytes(linears[name][0], linears[name][1], dtype) for name in free)
    chosen, report = mixed.allocation(options, fixed, settings)
    settings["allocated"] = {name: f.kind for name, f in chosen.items()}
    return {**fitted, **chosen}, report


def _ideal_bytes(linear, kind, dtype):
    return linear.weight.numel() * (LINEAR_BITS.get(kind) or FLOAT_BITS[dtype]) // 8


def _embedding_config(embedding):
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig

    group = embedding["group"]
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{embedding['bits']}"),
                                granularity=PerGroup(group) if group else PerAxis(0))


def _linear_config(kind, settings):
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_api import IntxWeightOnlyConfig, MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    granularity = PerGroup(settings["group_size"]) if kind == "b4w" else PerAxis(0)
    algorithm = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY if settings["scales"] == "hqq" else \
        IntxChooseQParamsAlgorithm.AFFINE
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{LINEAR_BITS[kind]}"), granularity=granularity,
                                mapping_type=MappingType[settings["mapping"].upper()],
                                intx_choose_qparams_algorithm=algorithm)


def weight_groups(model, settings, dtype, source=None):
    """{group: {"params": count, "bits": bits per weight}}: the linears by kind ("linear:c8w"; kind
    source by GGUF type, "linear:source:Q4_1"), embedding and other weights."""
    float_bits = FLOAT_BITS[dtype]
    groups = {}

    def add(group, bits, count):
        groups.setdefault(group, {"params": 0, "bits": bits})["params"] += count

    counted = set()
    for name, (m, kind) in _linears(model, settings).items():
        group, bits = source_blocks.group(source, name) if kind == "source" else \
            (f"linear:{kind}", LINEAR_BITS[kind] or float_bits)
        add(group, bits, m.weight.numel())
        counted.add(f"{name}.weight")
    embedding = settings["embedding"]["bits"] if settings["embedding"] else float_bits
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            add("embedding", embedding, m.weight.numel())
            counted.add(f"{name}.weight")
    add("other", float_bits, sum(p.numel() for n, p in model.named_parameters() if n not in counted))
    return groups


def ideal_bytes(groups):
    """The size of the weights alone at their bit widths (no scales, no container)."""
    return sum(g["params"] * g["bits"] // 8 for g in groups.values())


def export_program(model, spec, method, program, out_dir):
    """Export ``model``'s ``method`` for ``program``'s tokens per call into its file in ``out_dir``; returns
    the seconds taken."""
    log.info("exporting %s (%d tokens per call)", program["file"], program["seq_length"])
    started = time.time()
    # Non-strict: it traces with real Python instead of dynamo, seconds instead of minutes
    # on a real model, and gives the same graph for this plain static-shape module.
    exported = torch.export.export(model, io.example_inputs(spec, method, program["seq_length"]), strict=False)
    saved_programs.save(exported, Path(out_dir) / program["file"])
    return round(time.time() - started, 2)


def run(inputs, params, out_dir):
    """inputs: {"rewrite": rewrite entry dir, "calibrate": its entry dir where the recipe has that stage};
    params: the recipe's ``quantize:`` mapping."""
    rewrite_dir, out_dir = Path(inputs["rewrite"]), Path(out_dir)
    spec = io.read_spec(rewrite_dir)
    settings = resolve(params)
    model = io.load_model(rewrite_dir)
    source = _source(rewrite_dir, settings)
    started = time.time()
    fitted, allocation = fit_linears(model, settings, _statistics(inputs), spec["ane"]["dtype"])
    fit_seconds = round(time.time() - started, 1)
    if allocation:
        (out_dir / ALLOCATION_FILE).write_text(json.dumps(allocation, indent=1) + "\n")
    groups = weight_groups(model, settings, spec["ane"]["dtype"], source)
    model = quantize(model, settings, source, fitted)

    programs = {method: {"file": f"{method}.pt2", "seq_length": n} for method, n in io.methods(spec["ane"]).items()}
    # Each method after the first is exported in a forked copy of this process meanwhile: tracing
    # is single-threaded Python, and the copy shares the quantized model instead of redoing it.
    (first, *others), run_beside = programs, worker.beside_or_later(start="fork")
    with contextlib.ExitStack() as stack:
        pending = {m: stack.enter_context(run_beside(export_program, model, spec, m, programs[m], out_dir))
                   for m in others}
        seconds = {first: export_program(model, spec, first, programs[first], out_dir)}
        seconds.update((m, result()) for m, result in pending.items())
    metrics = {"ideal_bytes": ideal_bytes(groups), "fit_seconds": fit_seconds,
               **{f"{m}_export_seconds": t for m, t in seconds.items()}}

    io.copy_tokenizer(spec["tokenizer"], rewrite_dir, out_dir)
    quantize_section = {**settings, "weight_groups": groups, "ideal_bytes": metrics["ideal_bytes"]}
    io.write_spec({**spec, "quantize": quantize_section, "programs": programs}, out_dir)
    return metrics
