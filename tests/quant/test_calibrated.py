import pytest
import torch
from torch import nn

from ane_build.quant import calibrated, gptq


def weight_and_stats(out=32, columns=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, columns, generator=gen)
    inputs = torch.randn(256, columns, generator=gen) @ torch.randn(columns, columns, generator=gen)
    fisher = torch.rand(out, columns, generator=gen)
    return weight, fisher, inputs.T @ inputs


def test_a_chunk_reads_its_rows_of_the_layers_fisher_and_the_layers_inputs():
    fisher, xtx = torch.arange(12.0).reshape(6, 2), torch.eye(2)
    stats = {"output": {"fisher": fisher, "xtx": xtx, "tokens": 4}}
    rows, inputs = calibrated.rows_of(stats, "output.chunks.2", 2)
    assert torch.equal(rows, fisher[4:6]) and inputs is xtx
    assert torch.equal(calibrated.rows_of(stats, "output", 6)[0], fisher)


@pytest.mark.parametrize("kind", ["c8w", "c4w", "lut6", "lut4"])
@pytest.mark.parametrize("method", ["data-free", "fisher", "gptq"])
def test_the_estimate_is_half_the_fisher_weighted_error_of_what_apply_gives(kind, method):
    """The estimate and the applied weight come from the same codes, so the applied weight's error (its
    dequantization in fp32: what the exported program computes from the same integers) gives the estimate
    back, up to float64 summation order."""
    weight, fisher, xtx = weight_and_stats()
    fitted = calibrated.fit(weight, fisher, xtx, kind, method, palette_group=4, symmetric=kind == "c4w")
    linear = nn.Linear(64, 32, bias=False)
    linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
    applied = fitted.apply(linear, 4).weight.dequantize().float()
    error = 0.5 * float((fisher.double() * (weight.double() - applied.double()).square()).sum())
    assert fitted.estimated_kld == pytest.approx(error, rel=1e-9)
    assert fitted.kind == kind


def test_bytes_count_codes_scales_and_tables():
    weight, fisher, xtx = weight_and_stats()
    size = {kind: calibrated.fit(weight, fisher, xtx, kind, "fisher", 4, symmetric=False).bytes
            for kind in ("c8w", "c4w", "lut6", "lut4")}
    assert size == {"c8w": 32 * 64 + 32 * 4, "c4w": 32 * 64 // 2 + 32 * 4,
                    "lut6": 32 * 64 * 6 // 8 + 8 * 64 * 2, "lut4": 32 * 64 // 2 + 8 * 16 * 2}


def test_a_weight_already_on_the_grid_costs_nothing():
    """Each row spans [-128, 127] steps of its own scale, so min-max finds that grid (asymmetric: 255 steps
    over the range); the only error left is fp32 rounding of the scale, a few ulps of each weight."""
    scale = torch.rand(32, 1) + 0.5
    weight = torch.randint(-128, 128, (32, 64)).float() * scale
    weight[:, 0], weight[:, 1] = -128 * scale[:, 0], 127 * scale[:, 0]
    _, fisher, xtx = weight_and_stats()
    fitted = calibrated.fit(weight, fisher, xtx, "c8w", "data-free", 4, symmetric=False)
    assert fitted.estimated_kld <= 2.0 ** -40 * float((fisher.double() * weight.double().square()).sum())


def test_fisher_palettes_cost_less_estimated_error_than_plain_ones():
    """Weighted k-means minimises exactly the Fisher-weighted error the estimate sums."""
    weight, fisher, xtx = weight_and_stats()
    fisher = fisher ** 4  # a few weights matter much more than the rest
    plain, weighted = (calibrated.fit(weight, fisher, xtx, "lut4", method, 4, True).estimated_kld
                       for method in ("data-free", "fisher"))
    assert weighted < plain


def test_gptq_codes_reproduce_the_layers_outputs_closer_than_rounding():
    weight, fisher, xtx = weight_and_stats(seed=3)
    outputs_error = {}
    for method in ("data-free", "gptq"):
        qdata, scale, zero = calibrated.fit(weight, fisher, xtx, "c4w", method, 4, symmetric=True).codes
        delta = (weight - gptq.dequantize(qdata, scale, zero)).double()
        outputs_error[method] = float(torch.einsum("oi,ij,oj->", delta, xtx.double(), delta))
    assert outputs_error["gptq"] < outputs_error["data-free"]


def test_an_unknown_kind_is_refused():
    weight, fisher, xtx = weight_and_stats()
    with pytest.raises(ValueError, match="kind 'b4w'"):
        calibrated.fit(weight, fisher, xtx, "b4w", "fisher", 4, True)
