"""ExecuTorch 1.5's lowering, same programs out, in less time and memory.

``lean_lowering()`` wraps ``to_edge_transform_and_lower`` with the patches of ``PATCHES``, each
of which says what it replaces (on torch 2.13, ExecuTorch 1.5.1, coremltools 9.0), the upstream
issue or PR where one exists, and when it can go. Each is checked against the code it stands
in for (tests/programs/test_lowering.py), and each pays: leaving it out of the default recipe's
export costs at least 5% of the stage's time or memory (``benchmarks/lowering_patches.py``).
``ANE_BUILD_LOWERING_WITHOUT=name,...`` leaves patches out, for that benchmark: the programs
are the same bytes either way, so it is in no key.
"""

import collections
import contextlib
import copy
import logging
import operator
import os
import sys
import unittest.mock
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    why: str  # what the stock code does, and what the patch does instead
    target: str  # what it replaces
    upstream: str  # the upstream issue or PR, or "none filed"
    remove_when: str


PATCHES = {
    "sort_in_place": Patch(
        "Cutting out each partition re-sorts the graph into a new one and regenerates its Python code: "
        "0.25 s a partition, 30 s for the twin's 121. Here the nodes move into the same order in "
        "place, and the code is generated once at the end.",
        "executorch.exir.lowered_backend_module.legalize_graph and backend_api._create_partitions "
        "(ExecuTorch 1.5.1)",
        "none filed",
        "ExecuTorch stops re-sorting and recompiling the graph per partition"),
    "trace_once": Patch(
        "Each method is traced twice before its edge passes: once to make it functional, once more "
        "to decompose what its partitioner does not keep (a tenth of a lowering each). Here the one "
        "trace does both, with the kept ops asked of the program as exported.",
        "executorch.exir.program._program._apply_pre_decomposition_transforms (ExecuTorch 1.5.1) and "
        "torch.export.ExportedProgram.run_decompositions (torch 2.13)",
        "none filed",
        "to_edge_transform_and_lower decomposes in the trace that makes a program functional"),
    "idle_edge_passes": Patch(
        "Of ExecuTorch's ~10 edge passes, each re-tracing the whole program (a second a method), "
        "three change nothing in a graph without what they rewrite (aten.t, view ops, symbolic "
        "values): on such a graph they are skipped.",
        "NormalizeTransposePass, ReplaceBrokenOpsWithFunctionalOpsPass, SymToTensorPass .call "
        "(ExecuTorch 1.5.1)",
        "none filed",
        "those passes return early on a graph without what they rewrite"),
    "fused_edge_op_passes": Patch(
        "The last three aten-to-edge passes (mixed dtypes cast, ATen ops made edge ops, memory "
        "formats made dim orders) each rewrite one op at a time and hand it on, each re-tracing the "
        "program: here they run as one pass, each op through the three in turn.",
        "executorch.exir.program._program._get_aten_to_edge_passes, OpReplacePass, "
        "MemoryFormatOpsPass (ExecuTorch 1.5.1)",
        "none filed",
        "ExecuTorch runs its per-op edge passes as one"),
    "weight_sharing_copies": Patch(
        "Backends preprocess deep copies of all partitions, weights included, made up front. The "
        "Core ML and XNNPACK backends get copies sharing the weights (neither writes to them).",
        "CoreMLBackend and XnnpackBackend .copy_exported_program_for_preprocess (ExecuTorch 1.5.1)",
        "none filed",
        "ExecuTorch lets a backend declare that it does not write to the weights"),
    "xnnpack_linear_pass_only": Patch(
        "XNNPACK runs its 17 passes on each partition (the twin has 181 per method), each a fresh "
        "program. On a partition of linears, batched matmuls and softmaxes alone only its linear "
        "conversion can apply, so such a partition gets that one pass, as ExecuTorch's own "
        "dynamic-quantized linears do.",
        "executorch.backends.xnnpack._passes.XNNPACKPassManager.__init__ (ExecuTorch 1.5.1)",
        "pytorch/executorch#1893 (closed: XNNPACK preprocess slow from running every transform pass)",
        "XNNPACK's preprocess runs only the passes whose ops a partition holds"),
    "coreml_validate_once": Patch(
        "coremltools checks the whole MIL program after each of its ~110 passes, a quarter of a "
        "conversion, and after each of the ~110 it skips when merging methods into one "
        "multifunction model. The checks only raise; here they run after the passes that ask for "
        "the stricter scope check (dead code elimination, when it ran) and once at the end.",
        "coremltools.converters.mil.mil.passes.pass_pipeline.PassPipelineManager.apply_pipeline "
        "(coremltools 9.0)",
        "none filed",
        "coremltools validates once per pipeline"),
}
_MISSING_SAID = set()  # (patch, target) already reported missing in this process


@contextlib.contextmanager
def lean_lowering():
    """ExecuTorch 1.5's ``to_edge_transform_and_lower`` with the same programs out, in less time
    and memory: every patch of ``PATCHES`` but those ``ANE_BUILD_LOWERING_WITHOUT`` names. A
    patch whose target this toolchain lacks is left out with one warning (that lowering is only
    slower). Backends not imported yet are left alone (importing Core ML's costs 130 MB)."""
    stale = {}  # id -> graph module sorted since its code was last generated
    left_out = _left_out()
    with contextlib.ExitStack() as stack:
        for name, targets in _targets(stale).items():
            for owner, attr, replacing in () if name in left_out else targets:
                if hasattr(owner, attr):
                    stack.enter_context(unittest.mock.patch.object(owner, attr, replacing(getattr(owner, attr))))
                elif (name, attr) not in _MISSING_SAID:
                    _MISSING_SAID.add((name, attr))
                    log.warning("lean_lowering: %s has no %s: patch %s left out", owner, attr, name)
        yield
        _recompile(stale)


def _left_out():
    names = {n for n in os.environ.get("ANE_BUILD_LOWERING_WITHOUT", "").split(",") if n}
    if names - set(PATCHES):
        raise ValueError(f"ANE_BUILD_LOWERING_WITHOUT: no patch {sorted(names - set(PATCHES))}; "
                         f"expected names from {sorted(PATCHES)}")
    return names


def _targets(stale):
    """{patch name: [(owner, attribute, the replacement made from the original), ...]}."""
    from executorch.exir import lowered_backend_module
    from executorch.exir.backend import backend_api
    from executorch.exir.program import _program

    def legalize_in_place(graph_module):
        _topological_sort_in_place(graph_module.graph)
        stale[id(graph_module)] = graph_module
        return graph_module

    def recompiling(create_partitions):
        def wrapper(*args, **kwargs):
            try:
                return create_partitions(*args, **kwargs)
            finally:
                _recompile(stale)
        return wrapper

    coreml = sys.modules.get("executorch.backends.apple.coreml.compiler.coreml_preprocess")
    xnnpack = sys.modules.get("executorch.backends.xnnpack.xnnpack_preprocess")
    backends = [b for b in (getattr(coreml, "CoreMLBackend", None), getattr(xnnpack, "XnnpackBackend", None)) if b]
    return {
        "sort_in_place": [(lowered_backend_module, "legalize_graph", _always(legalize_in_place)),
                          (backend_api, "_create_partitions", recompiling)],
        "trace_once": [(_program, "_apply_pre_decomposition_transforms", _decomposing_up_front),
                       (torch.export.ExportedProgram, "run_decompositions", _functional_once)],
        "idle_edge_passes": _idle_edge_passes(),
        "fused_edge_op_passes": _fused_edge_op_passes(_program),
        "weight_sharing_copies": [(b, "copy_exported_program_for_preprocess", _always(classmethod(_copy_sharing_weights)))
                                  for b in backends],
        "xnnpack_linear_pass_only": _xnnpack_linear_pass_only() if xnnpack else [],
        "coreml_validate_once": _coreml_validate_once() if coreml else [],
    }


def _always(replacement):
    return lambda original: replacement


def _recompile(stale):
    while stale:
        stale.popitem()[1].recompile()


def _xnnpack_linear_pass_only():
    from executorch.backends.xnnpack._passes import XNNPACKPassManager

    return [(XNNPACKPassManager, "__init__", _linear_pass_only)]


def _coreml_validate_once():
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager

    return [(PassPipelineManager, "apply_pipeline", lambda original: staticmethod(_validating_once(original)))]


def copy_sharing_weights(program):
    """A deep copy of ``program`` whose weights are the program's own tensors (0.1 s, not 3 s)."""
    memo = {id(t): t for t in (*program.state_dict.values(), *program.constants.values())
            if isinstance(t, torch.Tensor)}
    return copy.deepcopy(program, memo)


def _copy_sharing_weights(cls, program, compile_specs):
    return copy_sharing_weights(program)


def _idle_edge_passes():
    """(pass class, "call", call skipping graphs it would leave as they are) for three edge passes."""
    from executorch.exir.passes.normalize_transpose_pass import NormalizeTransposePass
    from executorch.exir.passes.replace_broken_ops_with_function_ops_pass import (
        ReplaceBrokenOpsWithFunctionalOpsPass,
    )
    from executorch.exir.passes.sym_to_tensor_pass import SymToTensorPass

    def transposes(node):
        return node.op == "call_function" and node.target == torch.ops.aten.t.default

    def views(node):
        return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target.is_view

    def symbolic(node):  # a node without a value might be one
        return node.op in ("placeholder", "call_function") and (
            "val" not in node.meta or isinstance(node.meta["val"], (torch.SymInt, torch.SymFloat, torch.SymBool)))

    return [(NormalizeTransposePass, "call", _unless_idle(transposes)),
            (ReplaceBrokenOpsWithFunctionalOpsPass, "call", _unless_idle(views)),
            (SymToTensorPass, "call", _unless_idle(symbolic))]


def _unless_idle(rewrites):
    """Wraps an ExportPass's ``call`` to return the graph untouched when no node (in any submodule)
    is one it ``rewrites``."""
    from executorch.exir.pass_base import PassResult

    def wrap(call):
        def run(self, graph_module):
            graphs = [m.graph for m in graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
            if not any(rewrites(node) for graph in graphs for node in graph.nodes):
                return PassResult(graph_module, False)
            return call(self, graph_module)
        return run
    return wrap


def _fused_edge_op_passes(program_module):
    """Patches making ExecuTorch's last three aten-to-edge passes one.

    Each overrides only ``call_operator`` and ends in ``super().call_operator``, so a class
    inheriting all three, in order, hands each op through them as running them one after the
    other would. The one op a pass adds itself (a dtype cast, through ``self.call_operator``)
    also goes through all three, as in sequence the later two would see it and the first passes
    it on unchanged (it has one argument). The fused pass takes the place of the first; the
    other two, which ExecuTorch runs right after it, are then left with nothing to do."""
    from executorch.exir.pass_base import ExportPass, PassResult
    from executorch.exir.passes.memory_format_ops_pass import MemoryFormatOpsPass
    from executorch.exir.passes.remove_mixed_type_operators import (
        RemoveMixedTypeOperators,
    )
    from executorch.exir.passes.replace_aten_with_edge_pass import OpReplacePass

    class Done(ExportPass):
        def call(self, graph_module):
            return PassResult(graph_module, False)

    def fusing(get_passes):
        def edge_passes(config):
            pre, post = get_passes(config)
            if not any(type(p) is RemoveMixedTypeOperators for p in pre):  # the fused pass would not run
                raise RuntimeError("ExecuTorch's aten-to-edge passes changed; lean_lowering's fusion needs updating")
            chain = (RemoveMixedTypeOperators, OpReplacePass) + (() if config._skip_dim_order else (MemoryFormatOpsPass,))
            fused = type("FusedEdgeOpPasses", chain, {})
            return [fused() if type(p) is RemoveMixedTypeOperators else p for p in pre], post
        return edge_passes

    return [(program_module, "_get_aten_to_edge_passes", fusing),
            (program_module, "OpReplacePass", _always(Done)), (program_module, "MemoryFormatOpsPass", _always(Done))]


def _decomposing_up_front(apply_transforms):
    """ExecuTorch's pre-decomposition hook, then the one partitioner's decompositions, as its
    ``_gen_edge_manager_for_partitioners`` runs them when the partitioner has no per-node check."""
    from executorch.exir.program._program import _default_decomposition_table

    def apply(program, partitioners):
        program = apply_transforms(program, partitioners)
        if len(partitioners) != 1 or program.dialect != "TRAINING":
            return program
        kept, check = partitioners[0].ops_to_not_decompose(program)
        if check is not None:
            return program
        table = _default_decomposition_table()
        for op in kept:
            table.pop(op, None)
        return program.run_decompositions(table)
    return apply


def _functional_once(run_decompositions):
    """``ExportedProgram.run_decompositions``, returning a program already in ATen dialect as is
    when asked for no decomposition: it is functional, and a trace would give the same graph."""
    def run(self, decomp_table=None, decompose_custom_triton_ops=False):
        # type(): torch's default table is a dict subclass that compares equal to {}.
        if type(decomp_table) is dict and not decomp_table and self.dialect == "ATEN":
            return self
        return run_decompositions(self, decomp_table, decompose_custom_triton_ops)
    return run


def _linear_pass_only(init):
    """``XNNPACKPassManager.__init__``, choosing only the linear conversion for a graph of linears,
    batched matmuls and softmaxes alone."""
    from executorch.backends.xnnpack._passes import ConvertToLinearPass
    from executorch.exir.dialects._ops import ops as exir_ops

    alone = {exir_ops.edge.aten.linear.default, exir_ops.edge.aten.bmm.default, exir_ops.edge.aten._softmax.default}

    def __init__(self, exported_program, passes=None):
        calls = [node.target for node in exported_program.graph.nodes if node.op == "call_function"]
        if not passes and calls and all(target in alone for target in calls):
            passes = [ConvertToLinearPass]
        init(self, exported_program, passes)
    return __init__


def _validating_once(apply_pipeline):
    """coremltools' ``PassPipelineManager.apply_pipeline``, checking the program as said in ``lean_lowering``."""
    def apply(prog, pass_pipeline):
        check = prog.validate
        passes_run = not prog.skip_all_passes
        # Called after every pass, with the scope check on right after dead code elimination.
        prog.validate = lambda check_essential_scope=False: (
            check(check_essential_scope=True) if check_essential_scope and passes_run else None)
        try:
            apply_pipeline(prog, pass_pipeline)
        finally:
            del prog.validate
        check()
    return apply


def _topological_sort_in_place(graph):
    """Reorder ``graph``'s nodes as ``torch.fx.passes.tools_common.legalize_graph`` orders them."""
    first = {operator.add, operator.mul, operator.sub, operator.floordiv, operator.truediv, operator.mod,
             operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
             torch.ops.aten.sym_constrain_range.default, torch.ops.aten.sym_constrain_range_for_size.default,
             torch.ops.aten._assert_async.msg, torch.ops.aten.scalar_tensor.default,
             torch.ops.aten._assert_scalar.default}
    indegree = dict.fromkeys(graph.nodes, 0)
    for node in graph.nodes:
        for user in node.users:
            indegree[user] += 1
    queue = collections.deque(node for node, n in indegree.items() if n == 0)
    order = []
    while queue:
        node = queue.popleft()
        order.append(node)
        for user in node.users:
            indegree[user] -= 1
            if indegree[user] == 0:
                (queue.appendleft if user.op == "call_function" and user.target in first else queue.append)(user)
    if len(order) < len(indegree):
        raise RuntimeError(f"Input graph has cycles, unable to add {[n for n in indegree if indegree[n]]}")
    for node in order:
        graph._root.prepend(node)  # moves it to the end
