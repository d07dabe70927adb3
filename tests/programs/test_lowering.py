"""Each patch of ``lean_lowering`` answers as the ExecuTorch / torch code it stands in for."""

import contextlib
import copy
import re

import pytest
import torch
from torch.fx.passes.tools_common import legalize_graph

from ane_build.model import io
from ane_build.programs import lowering
from ane_build.stages import export
from tests.stages.tiny_entries import ane, build


class Branchy(torch.nn.Module):
    """Diamonds, a shared input and an unused branch: partitioners' dependency questions differ per node."""

    def forward(self, x, y):
        a = x.sin() + y
        b = a.cos() * x
        c = (a + b).relu()
        unused = y.exp()  # noqa: F841 - a node with no users
        return c - b, a.sum()


@pytest.fixture(scope="module")
def graph_module():
    return torch.export.export(Branchy(), (torch.randn(4), torch.randn(4))).graph_module


def test_in_place_sort_orders_as_legalize_graph(graph_module):
    def shuffled():  # every other op moved to the end: out of order, as a partition cut leaves a graph
        gm = copy.deepcopy(graph_module)
        for node in [n for n in gm.graph.nodes if n.op == "call_function"][::2]:
            gm.graph.output_node().prepend(node)
        return gm

    expected, ours = legalize_graph(shuffled()), shuffled()
    lowering._topological_sort_in_place(ours.graph)
    assert [n.name for n in ours.graph.nodes] == [n.name for n in expected.graph.nodes]
    assert [n.name for n in ours.graph.nodes] != [n.name for n in shuffled().graph.nodes]
    ours.graph.lint()


def test_copy_shares_weights_and_nothing_else():
    from torch.export import export as torch_export

    program = torch_export(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
    copied = lowering.copy_sharing_weights(program)
    assert copied.graph_module is not program.graph_module
    assert all(copied.state_dict[k] is program.state_dict[k] for k in program.state_dict)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_lean_lowering_writes_the_same_programs(tmp_path, monkeypatch, dtype):
    """With and without the patches: the same twin, byte for byte, and the same Core ML program
    but for the fresh UUIDs Core ML names its model and package files by (which also order
    the package manifest's entries, so its lines are compared as a multiset)."""
    entries, _ = build(tmp_path, "quantize", ane_params=ane(dtype=dtype, decode_method=True))
    spec = io.read_spec(entries["quantize"])
    # The constant methods export lowers with: the runner metadata and the rotary table.
    metadata, settings = io.constant_methods(spec), export.resolve({}, spec)

    def lowered(name):
        programs = export.load_programs(entries["quantize"], spec)
        coreml = export.lower_coreml(programs, settings, dtype, metadata, seed="test")
        twin = export.lower_twin(export.load_programs(entries["quantize"], spec), metadata)
        sizes = [export.write_pte(coreml, tmp_path / f"{name}.pte"),
                 export.write_pte(twin, tmp_path / f"{name}.twin.pte", quant_fusion=False)]
        return (export.delegation_report(coreml), sizes, _without_uuids((tmp_path / f"{name}.pte").read_bytes()),
                (tmp_path / f"{name}.twin.pte").read_bytes())

    lean = lowered("lean")
    monkeypatch.setattr(export, "lean_lowering", contextlib.nullcontext)
    assert lowered("stock") == lean


def _without_uuids(data):
    uuid = rb"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
    return sorted(re.sub(uuid, b"UUID", data).split(b"\n"))


class LinearThenRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.linear(x).relu()


class Scores(torch.nn.Module):
    """Attention's batched matmuls and softmax, as the twin's attention partitions hold them."""

    def forward(self, q, k, v):
        return torch.bmm(torch.bmm(q, k).softmax(-1), v)


@pytest.mark.parametrize("model, inputs, alone", [
    (torch.nn.Linear(8, 4), (torch.randn(2, 8),), True),
    (Scores(), (torch.randn(2, 3, 8), torch.randn(2, 8, 5), torch.randn(2, 5, 4)), True),
    (LinearThenRelu(), (torch.randn(2, 8),), False),
])
def test_xnnpack_runs_only_the_linear_pass_on_linears_matmuls_and_softmaxes_alone(model, inputs, alone):
    from executorch.backends.xnnpack._passes import (
        ConvertToLinearPass,
        XNNPACKPassManager,
    )
    from executorch.exir import EdgeCompileConfig, to_edge

    config = EdgeCompileConfig(preserve_ops=[torch.ops.aten.linear.default])
    program = to_edge(torch.export.export(model, inputs), compile_config=config).exported_program()
    stock = XNNPACKPassManager(program).passes
    with lowering.lean_lowering():
        lean = XNNPACKPassManager(program).passes
    assert lean == ([ConvertToLinearPass] if alone else stock) and len(stock) > 10


def test_a_functional_program_is_not_traced_again(graph_module):
    exported = torch.export.export(Branchy(), (torch.randn(4), torch.randn(4)))
    functional = exported.run_decompositions({})
    assert functional.run_decompositions({}).graph_module.code == functional.graph_module.code  # what is skipped
    with lowering.lean_lowering():
        assert functional.run_decompositions({}) is functional
        assert exported.run_decompositions({}) is not exported  # not functional yet
        # torch's default table is a dict that compares equal to {}: it still decomposes
        assert functional.run_decompositions(torch.export.default_decompositions()) is not functional


def test_each_method_is_traced_once_before_its_edge_passes(monkeypatch):
    """Made functional and decomposed (silu: the linears' partitioner keeps only linears) in one trace."""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.program import _program

    traces, seen = [], []
    run_decompositions, generate = torch.export.ExportedProgram.run_decompositions, _program._generate_edge_program
    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions",
                        lambda self, *args, **kwargs: traces.append(1) or run_decompositions(self, *args, **kwargs))
    monkeypatch.setattr(_program, "_generate_edge_program",
                        lambda *args, **kwargs: seen.append(len(traces)) or generate(*args, **kwargs))
    program = torch.export.export(LinearThenSilu(), (torch.randn(2, 8),))

    def lower():
        traces.clear(), seen.clear()
        manager = to_edge_transform_and_lower(program, partitioner=[export._twin_partitioner()()])
        return seen[0], manager.exported_program().graph_module.code

    stock = lower()
    with lowering.lean_lowering():
        lean = lower()
    assert (stock[0], lean[0]) == (2, 1) and lean[1] == stock[1]


class LinearThenSilu(LinearThenRelu):
    def forward(self, x):
        return torch.nn.functional.silu(self.linear(x))


class Transposed(torch.nn.Module):
    def forward(self, x):
        return torch.ops.aten.t.default(x) * 2


class Viewed(torch.nn.Module):
    def forward(self, x):
        return x.view(12) * 2


class Sized(torch.nn.Module):
    def forward(self, x):
        return x.view(x.shape[0] * 4) + x.shape[0]


class Doubled(torch.nn.Module):
    def forward(self, x):
        return x * 2


@pytest.mark.parametrize("name, rewritten", [("NormalizeTransposePass", Transposed),
                                             ("ReplaceBrokenOpsWithFunctionalOpsPass", Viewed),
                                             ("SymToTensorPass", Sized)])
def test_edge_passes_skip_only_graphs_they_leave_as_they_are(name, rewritten):
    from executorch.exir import passes

    edge_pass = getattr(passes, name)
    for model in (rewritten(), Doubled()):
        dynamic = {"x": {0: torch.export.Dim("rows", min=2, max=8)}} if isinstance(model, Sized) else None
        graph_module = torch.export.export(model, (torch.randn(3, 4),), dynamic_shapes=dynamic) \
            .run_decompositions({}).graph_module
        original = graph_module.code
        stock = edge_pass()(copy.deepcopy(graph_module)).graph_module.code
        with lowering.lean_lowering():
            lean = edge_pass()(graph_module).graph_module
        assert lean.code == stock
        assert (lean is graph_module) == isinstance(model, Doubled)  # skipped only when idle
        assert (stock != original) == isinstance(model, rewritten)  # the pass does rewrite its graph


class MixedTypes(torch.nn.Module):
    """An fp16 tensor times an fp32 one (a cast added), copies in a memory format (dim orders)."""

    def forward(self, x, y):
        return (x.half() * y).clone(memory_format=torch.contiguous_format) + y.to(torch.float16)


@pytest.mark.parametrize("skip_dim_order", [False, True])
def test_fused_edge_op_passes_write_the_same_edge_program(skip_dim_order):
    from executorch.exir import EdgeCompileConfig, to_edge

    program = torch.export.export(MixedTypes(), (torch.randn(2, 3), torch.randn(2, 3)))
    config = EdgeCompileConfig(_skip_dim_order=skip_dim_order)
    stock = to_edge(program, compile_config=config).exported_program().graph_module.code
    with lowering.lean_lowering():
        lean = to_edge(program, compile_config=config).exported_program().graph_module.code
    assert lean == stock
    assert stock.count("dtype = torch.float32") == 2  # the casts the mixed-dtype pass adds itself
    assert ("_clone_dim_order" in stock) != skip_dim_order  # the memory format pass ran, or not


def test_a_patch_left_out_by_name_is_not_applied_and_an_unknown_name_is_refused(monkeypatch):
    from executorch.exir.program import _program

    stock = _program._get_aten_to_edge_passes
    monkeypatch.setenv("ANE_BUILD_LOWERING_WITHOUT", "fused_edge_op_passes")
    with lowering.lean_lowering():
        assert _program._get_aten_to_edge_passes is stock
    monkeypatch.setenv("ANE_BUILD_LOWERING_WITHOUT", "no_such_patch")
    with pytest.raises(ValueError, match="no patch \\['no_such_patch'\\]"):
        with lowering.lean_lowering():
            pass


def test_a_patch_whose_target_is_missing_is_said_once(monkeypatch, caplog):
    from executorch.exir.program import _program

    monkeypatch.delattr(_program, "_apply_pre_decomposition_transforms")
    monkeypatch.setattr(lowering, "_MISSING_SAID", set())
    for _ in range(2):
        with lowering.lean_lowering():
            pass
    said = [r.getMessage() for r in caplog.records if "_apply_pre_decomposition_transforms" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("patch trace_once left out")
