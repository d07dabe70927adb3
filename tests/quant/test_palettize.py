"""Palettized linears: few values per group, close to the weights, better than a grid, exported as a table look-up."""

import pytest
import torch
from torch import nn
from torchao.utils import unwrap_tensor_subclass

from ane_build.quant.palettize import palettize_linears
from ane_build.stages import export
from tests.quant.coreml_luts import lowered_luts

ROWS, COLUMNS = 32, 64


def laplace(shape, gen):
    """Most weights near zero and a few far out, like a trained model's."""
    uniform = torch.rand(shape, generator=gen) - 0.5
    return -uniform.sign() * torch.log1p(-2 * uniform.abs()) / 20


class TwoLinears(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(COLUMNS, ROWS, bias=False, dtype=dtype)
        self.down = nn.Linear(ROWS, COLUMNS, dtype=dtype)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in (self.up, self.down):
                m.weight.copy_(laplace(m.weight.shape, gen))

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def groups(weight, group_size):
    return weight.reshape(-1, (group_size or weight.shape[0]) * weight.shape[1])


def relative_error(got, want):
    return ((got.float() - want.float()).pow(2).mean() / want.float().pow(2).mean()).item()


def uniform_grid(weight, bits, group_size):
    """Each group rounded to 2**bits levels evenly spaced from its minimum to its maximum."""
    g = groups(weight, group_size)
    low, high = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    step = (high - low) / (2**bits - 1)
    return (torch.round((g - low) / step) * step + low).reshape(weight.shape)


@pytest.mark.parametrize("bits,group_size", [(4, 16), (6, 16), (4, None), (8, 32)])
def test_each_group_takes_at_most_2_to_the_bits_values_close_to_its_weights(bits, group_size):
    model = TwoLinears()
    original = model.up.weight.detach().clone()
    palettize_linears(model, bits, group_size)
    weight = model.up.weight.dequantize()
    assert weight.shape == original.shape and weight.dtype == original.dtype
    assert max(len(g.unique()) for g in groups(weight, group_size)) <= 2**bits
    # ~1% of the weights' power at 4 bits, 4x less per extra bit.
    assert relative_error(weight, original) < 0.02 / 4 ** (bits - 4)


@pytest.mark.parametrize("bits", [4, 6])
def test_k_means_beats_a_uniform_grid(bits):
    model = TwoLinears()
    original = model.up.weight.detach().clone()
    palettize_linears(model, bits, 16)
    assert relative_error(model.up.weight.dequantize(), original) < \
        0.7 * relative_error(uniform_grid(original, bits, 16), original)


def test_the_exported_program_looks_up_tables_for_the_chosen_linears_only():
    model = palettize_linears(TwoLinears(), 4, 16, lambda m, name: name == "up")
    program = torch.export.export(unwrap_tensor_subclass(model), (torch.randn(2, COLUMNS),), strict=False)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.quant.dequantize_codebook.default) == 1
    assert isinstance(model.down.weight, nn.Parameter) and type(model.down.weight.data) is torch.Tensor


def test_core_ml_takes_the_look_up_as_its_constexpr_lut_to_dense(monkeypatch):
    from coremltools.converters.mil.mil.types import builtin_to_string

    model = unwrap_tensor_subclass(palettize_linears(TwoLinears(torch.float16), 6, 16))
    report, luts = lowered_luts(model, COLUMNS, monkeypatch)
    assert report["cpu_ops"] == {} and report["coreml_partitions"] == 1
    # One 64-entry table per 16 rows, indices of 6 bits, for each linear.
    assert sorted(op.lut.shape for op in luts) == [(ROWS // 16, 1, 64, 1), (COLUMNS // 16, 1, 64, 1)]
    assert {builtin_to_string(op.indices.dtype) for op in luts} == {"uint6"}


def test_the_cpu_twin_folds_the_tables_and_matches_the_eager_model():
    from executorch.runtime import Runtime

    model = unwrap_tensor_subclass(palettize_linears(TwoLinears(), 4, 16))
    x = torch.randn(2, COLUMNS)
    twin = export.lower_twin({"forward": torch.export.export(model, (x,), strict=False)}, {})
    calls = [str(n.target) for n in twin.exported_program("forward").graph.nodes if n.op == "call_function"]
    assert not any("codebook" in call for call in calls)
    program = Runtime.get().load_program(twin.to_executorch().buffer)
    got = program.load_method("forward").execute([x])[0]
    assert (got - model(x)).abs().max() < 1e-5


@pytest.mark.parametrize("bits,group_size,message", [
    (3, 16, "accelerates palettes of"),
    (4, 0, "expected a positive integer"),
    (4, 24, "does not divide layer up's 32 output channels"),
])
def test_settings_torchao_would_reject_deep_inside_are_refused_up_front(bits, group_size, message):
    with pytest.raises(ValueError, match=message):
        palettize_linears(TwoLinears(), bits, group_size)
