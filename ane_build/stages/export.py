"""export: quantize entry + recipe ``export:`` -> the Core ML ``.pte``, its delegation report, a CPU twin.

- ``model.pte``: every method (a one-token forward and a prefill when the recipe asks for a
  decode method, else the seed's single forward) lowered with the Core ML partitioner. Several methods become one Core ML multifunction model per
  partition, whose weights are stored once (ExecuTorch's POSITIONAL weight sharing, the
  Core ML backend's default for multi-method lowering).
- ``delegation.json`` / ``delegation.txt``: how much of each method Core ML took, and
  every op left on the CPU.
- ``lint.json`` / ``lint.md``: the ops of ``model.pte`` that break what the Neural Engine is
  reported to take (``ane_build.analysis.lint``); with ``ane_lint: error`` one outside the allowlist
  fails the stage, with ``warn`` it is logged.
- ``twin.pte``: the same saved programs lowered for the CPU (linears on XNNPACK), for
  hosts without Core ML (ExecuTorch's Linux runtime), in a second process meanwhile (after
  Core ML, in this process, with ``ANE_BUILD_JOBS=1``, or where both would not fit the memory
  available: ``both_lowerings_bytes``).
  torchao's ``dequantize_affine`` has no ExecuTorch CPU kernel, so the dequantization of
  the constant weights is folded into constants first.
- Core ML payloads of at most ``max_payload_mb`` of weights each: a bigger program is cut between
  layers (``programs.payload_split``); ``payload_mb`` in the metrics lists them.
- ``params.json`` (what upstream's runners read) and the tokenizer, beside the programs.

Both carry the runner metadata and the rotary table (``io.constant_methods``) as constant
methods. Each lowering loads the programs from the quantize entry itself and runs under
``lean_lowering``: ExecuTorch's own lowering, same output, in less time and memory.
"""

import hashlib
import json
import logging
import operator
import time
from collections import Counter
from pathlib import Path

from ane_build.analysis import cost, lint
from ane_build.cache.filehash import sha256_file
from ane_build.model import io
from ane_build.programs import coreml_program, payload_split, reproducible_coreml, saved_programs
from ane_build.programs.lowering import lean_lowering
from ane_build.schema import COMPUTE_UNITS, DEPLOYMENT_TARGETS, SCHEMA
from ane_build.stages import quantize
from ane_build.util import worker
from ane_build.util.errors import UserError
from ane_build.util.memory import release_memory

log = logging.getLogger(__name__)
MODEL_FILE = "model.pte"
TWIN_FILE = "twin.pte"
LINT_MODES = SCHEMA["export"]["ane_lint"].choices


def resolve(params, spec):
    """The ``export:`` settings checked against the quantized programs they will lower."""
    settings = {
        "minimum_deployment_target": params.get("minimum_deployment_target", "iOS18"),
        "compute_unit": params.get("compute_unit", "CPU_AND_NE"),
        "require_full_delegation": params.get("require_full_delegation", True),
        "max_payload_mb": params.get("max_payload_mb", SCHEMA["export"]["max_payload_mb"].default),
        # Recipes default to error (the schema); a call without the setting (a test, a library
        # user) reports the lint without refusing the program.
        "ane_lint": params.get("ane_lint", "warn"),
    }
    for key, choices in (("minimum_deployment_target", DEPLOYMENT_TARGETS), ("compute_unit", COMPUTE_UNITS),
                         ("ane_lint", LINT_MODES)):
        if settings[key] not in choices:
            raise UserError("", f"export.{key}={settings[key]!r}: expected one of {', '.join(choices)}")
    needs = _ios18_reasons(spec)
    if needs and settings["minimum_deployment_target"] != "iOS18":
        raise UserError("", f"export.minimum_deployment_target={settings['minimum_deployment_target']}: "
                            f"Core ML before iOS18 cannot take {' and '.join(needs)}; set it to iOS18")
    return settings


def _ios18_reasons(spec):
    """What in the programs needs iOS18's Core ML (checked on coremltools 9.0)."""
    reasons = []
    if spec["ane"]["dtype"] == "fp16":
        # Before iOS18 the converter decomposes attention and adds the fp16 mask to fp32 scores.
        reasons.append("an fp16 model (ane.dtype=fp16)")
    quantized = spec["quantize"]
    kinds = quantize.quantized_kinds(quantized)
    if kinds:
        reasons.append(f"quantized linear weights ({'/'.join(kinds)}: quantize.linear={quantized['linear']})")
    embedding = quantized["embedding"]
    # Older targets dequantize only 8-bit weights with one scale per row.
    if embedding and (embedding["bits"] != 8 or embedding["group"]):
        spec_text = f"{embedding['bits']},{embedding['group']}"
        reasons.append(f"this embedding quantization (quantize.embedding={spec_text})")
    return reasons


def both_lowerings_bytes(spec):
    """The process tree's peak with the twin lowering beside Core ML: ~1 GB and 12x the quantized weights
    (measured 2.2-2.4 GB for SmolLM2-135M's 124 MB, 17.2 GB for the Llama-3.2-1B shape's 1.5 GB:
    benchmarks/README.md). Where less is available the twin lowers after Core ML (12.3 GB for the 1B)."""
    return 1e9 + 12 * spec["quantize"]["ideal_bytes"]


def load_programs(entry, spec):
    """{method: ExportedProgram} of a quantize entry, forward first (the multifunction default)."""
    files = {method: Path(entry) / spec["programs"][method]["file"] for method in io.methods(spec["ane"])}
    return {method: saved_programs.load(file) for method, file in files.items()}


def lower_coreml(programs, settings, dtype, metadata, seed):
    """An EdgeProgramManager with every method delegated to Core ML as far as it goes; its
    payloads are named after ``seed`` (see ``reproducible_coreml``)."""
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    from executorch.exir import to_edge_transform_and_lower

    compile_specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=getattr(ct.target, settings["minimum_deployment_target"]),
        compute_precision={"fp16": ct.precision.FLOAT16, "fp32": ct.precision.FLOAT32}[dtype],
        compute_unit=ct.ComputeUnit[settings["compute_unit"]],
        model_type=CoreMLBackend.MODEL_TYPE.MODEL,
    )
    # The caller owns the KV caches (they are inputs and outputs), so there is no mutable
    # buffer for Core ML to take over, as in the seed.
    partitioner = payload_split.limited(CoreMLPartitioner)(
        compile_specs=compile_specs, take_over_mutable_buffer=False, skip_ops_for_coreml_delegation=[],
        max_payload_bytes=int(settings["max_payload_mb"] * 1e6))
    with lean_lowering(), reproducible_coreml.deterministic_payloads(seed):
        return to_edge_transform_and_lower(programs, partitioner=[partitioner], constant_methods=metadata,
                                           compile_config=_edge_config())


def payload_seed(quant_dir, spec, settings):
    """What the Core ML payloads are named after: the programs lowered and how, so a different model
    gets a different name (a device caches compiled models by it) and the same model the same one."""
    programs = {method: sha256_file(Path(quant_dir) / p["file"]) for method, p in sorted(spec["programs"].items())}
    text = json.dumps({"programs": programs, "export": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def lower_twin(programs, metadata):
    """An EdgeProgramManager of ``programs`` for the CPU: linears on XNNPACK, portable kernels for the rest.

    Folds the programs in place. Only constant weights feed dequantize_affine here, so
    constant propagation removes every call to it (ExecuTorch's default skips quantization
    ops; only its ``full`` skip is kept, as folding ``full`` just bloats the file).

    Linears and attention's matmuls and softmax only: with every XNNPACK op, the ops XNNPACK
    lacks (mean, the attention mask's logic...) cut each layer into ~13 partitions, and
    ExecuTorch's partitioning time grows with partitions x graph size: SmolLM2-135M's twin
    took 8 min that way, 3 min with linears alone. The linears are nearly all the FLOPs; the
    attention reads the whole KV cache on every call, which portable fp16 kernels make the
    slowest part of a decode step.
    """
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.generic_node_configs import (
        BMMConfig,
        SoftmaxConfig,
    )
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.passes.constant_prop_pass import (
        constant_prop_pass,
        get_default_skip_targets_no_quant,
    )

    skip = get_default_skip_targets_no_quant()
    folded = {m: constant_prop_pass(ep, custom_skip_targets=skip) for m, ep in programs.items()}
    with lean_lowering():
        return to_edge_transform_and_lower(folded, partitioner=[_twin_partitioner()(configs=[LinearConfig, BMMConfig, SoftmaxConfig])],
                                           constant_methods=metadata, compile_config=_edge_config())


def _edge_config():
    """ExecuTorch's default without its IR checks: they run the graph on fake tensors for every
    program built (seconds each) and change nothing in it."""
    from executorch.exir import EdgeCompileConfig

    return EdgeCompileConfig(_check_ir_validity=False)


def _twin_partitioner():
    """XnnpackPartitioner, dropping its per-node check of the ops to keep whole when it passes them all.

    With a check, ExecuTorch keeps those ops (linear) through two extra decompositions of the
    whole program; without, by leaving them out of its decomposition table. Same nodes kept
    when every candidate passes, so then the cheap way is taken."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )

    class TwinPartitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep):
            ops, check = super().ops_to_not_decompose(ep)
            candidates = [n for n in ep.graph.nodes if n.op == "call_function" and n.target in ops]
            return (ops, None) if check is not None and all(map(check, candidates)) else (ops, check)

    return TwinPartitioner


def write_pte(manager, path, quant_fusion=True):
    """Serialize an EdgeProgramManager with the seed's ExecuTorch settings; returns the file size.

    ``quant_fusion=False`` (the twin): when no quantized op is left, ExecuTorch's quant fusion
    would only search the whole graph for its patterns (seconds); the constant propagation
    it comes with runs alone, and the program written is the same.
    """
    from executorch.exir.capture._config import ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass
    from executorch.exir.passes.sym_shape_eval_pass import (
        ConstraintBasedSymShapeEvalPass,
    )

    programs = [manager.exported_program(method) for method in manager.methods]
    quant_fusion = quant_fusion or any(getattr(node.target, "namespace", None) in ("quantized_decomposed", "torchao")
                                       for ep in programs for node in ep.graph.nodes)
    if not quant_fusion:
        for ep in programs:
            constant_prop_pass(ep)
    with lean_lowering():
        program = manager.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            do_quant_fusion_and_const_prop=quant_fusion,
            # Inputs are the caller's memory (its caches), not planned into the arena.
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        ))
    with open(path, "wb") as f:
        program.write_to_file(f)
    return Path(path).stat().st_size


def delegation_report(manager):
    """How much of each method Core ML took: ops inside its partitions, and every op left outside."""
    from torch._higher_order_ops.executorch_call_delegate import (
        executorch_call_delegate,
    )

    methods = {}
    for method in sorted(manager.methods):  # a set: its order changes with each process's string hashing
        graph_module = manager.exported_program(method).graph_module
        delegated, cpu, partitions = Counter(), Counter(), 0
        for node in _calls(graph_module):
            if node.target is executorch_call_delegate:
                partitions += 1
                lowered = getattr(graph_module, node.args[0].target)
                delegated.update(_op_name(n) for n in _calls(lowered.original_module))
            elif node.target is not operator.getitem:  # unpacks a delegate's outputs: no kernel
                cpu[_op_name(node)] += 1
        methods[method] = {
            "partitions": partitions,
            "delegated_ops": sum(delegated.values()),
            "cpu_ops": dict(cpu.most_common()),
            "delegated_op_types": dict(delegated.most_common()),
            "delegated_share": _share(sum(delegated.values()), sum(cpu.values())),
        }
    total_delegated = sum(m["delegated_ops"] for m in methods.values())
    total_cpu = Counter()
    for m in methods.values():
        total_cpu.update(m["cpu_ops"])
    return {"backend": "CoreMLBackend",
            "delegated_share": _share(total_delegated, sum(total_cpu.values())),
            "coreml_partitions": sum(m["partitions"] for m in methods.values()),
            "cpu_ops": dict(total_cpu.most_common()),
            "methods": methods}


def _calls(graph_module):
    return [node for node in graph_module.graph.nodes if node.op == "call_function"]


def _op_name(node):
    return getattr(node.target, "__name__", str(node.target))


def _share(n_delegated, n_cpu):
    return round(n_delegated / (n_delegated + n_cpu), 4) if n_delegated + n_cpu else 1.0


def _ops_text(ops):
    return ", ".join(f"{name} x{count}" for name, count in ops.items())


def write_report(report, out_dir):
    (Path(out_dir) / "delegation.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [(f"Core ML delegation of {MODEL_FILE}: {report['delegated_share']:.1%} of ops delegated, "
              f"{report['coreml_partitions']} Core ML partition(s) in all")]
    for method, m in report["methods"].items():
        lines.append(f"{method}: {m['partitions']} partition(s), {m['delegated_ops']} ops delegated, "
                     f"{sum(m['cpu_ops'].values())} on the CPU")
        lines += [f"    CPU  {count:5d}  {name}" for name, count in m["cpu_ops"].items()]
    (Path(out_dir) / "delegation.txt").write_text("\n".join(lines) + "\n")


def run(inputs, params, out_dir):
    """inputs: {"quantize": quantize entry dir}; params: the recipe's ``export:`` mapping."""
    quant_dir, out_dir = Path(inputs["quantize"]), Path(out_dir)
    spec = io.read_spec(quant_dir)
    settings = resolve(params, spec)
    # The twin lowers in a second process meanwhile: the two lowerings share nothing but their
    # input files, and each is single-threaded Python (ExecuTorch's and coremltools' passes),
    # so on two cores the stage takes the longer of the two instead of their sum.
    run_twin = worker.beside_or_later(needs_bytes=both_lowerings_bytes(spec))
    with run_twin(write_twin, quant_dir, out_dir / TWIN_FILE) as twin_result:
        started = time.time()
        log.info("lowering %s to Core ML (%s, %s, %s); the CPU twin %s", ", ".join(spec["programs"]),
                 settings["minimum_deployment_target"], settings["compute_unit"], spec["ane"]["dtype"],
                 "after it" if run_twin is worker.later else "beside it")
        coreml = lower_coreml(load_programs(quant_dir, spec), settings, spec["ane"]["dtype"], io.constant_methods(spec),
                              payload_seed(quant_dir, spec, settings))
        report = delegation_report(coreml)
        write_report(report, out_dir)
        if settings["require_full_delegation"] and report["cpu_ops"]:
            raise UserError("export.require_full_delegation",
                            f"{_ops_text(report['cpu_ops'])} stay on the CPU instead of Core ML; "
                            "set it to false to build anyway (delegation.txt then lists them)")
        pte_bytes = write_pte(coreml, out_dir / MODEL_FILE)
        payloads = payload_sizes(out_dir / MODEL_FILE, settings["max_payload_mb"])
        coreml_seconds = time.time() - started
        del coreml
        release_memory()
        lint_metrics = check_lint(out_dir, settings["ane_lint"])  # while the twin lowers
        twin_bytes, twin_seconds = twin_result()

    io.copy_tokenizer(spec["tokenizer"], quant_dir, out_dir)
    io.write_params(spec, out_dir)
    io.write_spec({**spec, "export": settings, "metadata": io.runner_metadata(spec)}, out_dir)
    cost.write(spec, out_dir)
    ideal = spec["quantize"]["ideal_bytes"]
    return {
        "pte_bytes": pte_bytes,
        "ideal_bytes": ideal,
        "pte_over_ideal": round(pte_bytes / ideal, 4),
        "twin_bytes": twin_bytes,
        "delegated_share": report["delegated_share"],
        "coreml_partitions": report["coreml_partitions"],
        "payload_mb": [round(size / 1e6, 3) for size in payloads],
        "cpu_ops": sum(report["cpu_ops"].values()),
        **lint_metrics,
        "coreml_seconds": round(coreml_seconds, 2),
        "twin_seconds": round(twin_seconds, 2),
    }


def payload_sizes(path, max_mb):
    """[bytes of each Core ML payload in ``path``]; UserError if one is over ``max_mb``, which the cut
    between layers keeps their weights under (a payload also holds its program, a few hundred kB)."""
    sizes = [len(payload) for _, payload in coreml_program.coreml_payloads(path)]
    for number, size in enumerate(sizes, 1):
        if size > max_mb * 1e6:
            raise UserError("export.max_payload_mb", f"{max_mb:g}: Core ML payload {number} of {MODEL_FILE} "
                                                     f"takes {size / 1e6:.1f} MB")
    return sizes


def check_lint(out_dir, mode):
    """Lint ``model.pte`` into lint.json and lint.md; its summary for the metrics ({} when ``mode`` is off).

    ``error``: a finding outside the allowlist fails the stage, in one line, once the reports are
    written (the store then drops the entry: ``warn`` keeps it, reports and all)."""
    if mode == "off":
        return {}
    report = lint.lint(Path(out_dir) / MODEL_FILE)
    lint.write(report, out_dir)
    if not report["clean"]:
        message = f"{MODEL_FILE}: {lint.summary(report)}; first, {lint.first_finding(report)}"
        if mode == "error":
            raise UserError("export.ane_lint", f"{message}; set it to warn to build anyway (lint.md lists them)")
        log.warning("export.ane_lint: %s; %s lists them", message, lint.MARKDOWN_FILE)
    return {"lint_findings": report["findings"], "lint_allowlisted": report["allowlisted"],
            "lint_by_rule": report["by_rule"]}


def write_twin(quant_dir, path):
    """Lower the quantize entry's programs to the CPU twin at ``path``; returns (bytes, seconds)."""
    started = time.time()
    spec = io.read_spec(quant_dir)
    twin = lower_twin(load_programs(quant_dir, spec), io.constant_methods(spec))
    release_memory()  # the folded programs' leftovers, before serializing
    twin_bytes = write_pte(twin, path, quant_fusion=False)  # dequantizations all folded
    return twin_bytes, time.time() - started
