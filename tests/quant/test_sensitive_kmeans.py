"""Sensitivity-weighted k-means palettes: each a local optimum of the weighted error, at least as good
on it as plain k-means, exact where the importance is; and exported as the plain path's look-up."""

import pytest
import torch
from torch import nn
from torchao.utils import unwrap_tensor_subclass

from ane_build.quant.palettize import palettize_linears
from ane_build.quant.sensitive_kmeans import dequantize, fit, palettize, weighted_error
from tests.quant.coreml_luts import lowered_luts

ROWS, COLUMNS = 32, 64
EPS = torch.finfo(torch.float32).eps


def laplace(shape, seed=0):
    """Most weights near zero and a few far out, like a trained model's."""
    uniform = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) - 0.5
    return -uniform.sign() * torch.log1p(-2 * uniform.abs()) / 20


def fisher_like(shape, seed=0):
    """Importance over orders of magnitude, as squared gradients are."""
    return torch.exp(2 * torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100)))


def groups(tensor, group_size):
    return tensor.reshape(-1, (group_size or tensor.shape[0]) * tensor.shape[1])


@pytest.mark.parametrize("bits,group_size", [(4, 1), (6, 1), (4, 16), (6, 16), (2, None), (8, 8)])
def test_codes_index_one_sorted_table_per_group(bits, group_size):
    weight = laplace((ROWS, COLUMNS))
    codes, tables = fit(weight, fisher_like(weight.shape), bits, group_size)
    assert codes.shape == weight.shape and codes.dtype == torch.uint8
    assert tables.shape == (ROWS // (group_size or ROWS), 2**bits) and tables.dtype == torch.float32
    assert int(codes.max()) < 2**bits
    assert (tables.diff(dim=1) >= 0).all()
    assert max(len(g.unique()) for g in groups(dequantize(codes, tables, group_size), group_size)) <= 2**bits


@pytest.mark.parametrize("importance", ["none", "fisher_like"])
@pytest.mark.parametrize("bits,group_size", [(4, 1), (4, 16), (6, 16)])
def test_the_fit_is_a_fixed_point_of_lloyds_algorithm(bits, group_size, importance):
    weight = laplace((ROWS, COLUMNS))
    importance = None if importance == "none" else fisher_like(weight.shape)
    codes, tables = fit(weight, importance, bits, group_size)
    w, c = groups(weight, group_size).double(), groups(codes, group_size).long()
    imp = torch.ones_like(w) if importance is None else groups(importance, group_size).double()
    t = tables.double()
    # Each weight takes its nearest entry (up to a midpoint's rounding, an ulp of the weights).
    distance = (w - t.gather(1, c)).abs()
    assert (distance <= (w[..., None] - t[:, None, :]).abs().amin(-1) + EPS * w.abs().amax()).all()
    # Each used entry is its weights' weighted mean, rounded to fp32. The fit takes the mean from
    # differences of float64 running sums over the group's n values, each sum off by up to
    # n * eps64 * (its terms' absolute sum): a cluster of little importance divides that by its mass.
    mass = torch.zeros_like(t).scatter_add_(1, c, imp)
    means = torch.zeros_like(t).scatter_add_(1, c, imp * w) / mass
    n, eps64 = w.shape[1], torch.finfo(torch.float64).eps
    sums = (imp * w).abs().sum(1, keepdim=True) + means.abs() * imp.sum(1, keepdim=True)
    bound = EPS * means.abs() + 2 * n * eps64 * sums / mass
    used = mass > 0
    assert ((t - means).abs()[used] <= bound[used]).all()


def test_no_importance_and_unit_importance_are_plain_k_means_alike():
    weight = laplace((ROWS, COLUMNS))
    plain = fit(weight, None, 4, 16)
    ones = fit(weight, torch.ones_like(weight), 4, 16)
    assert torch.equal(plain[0], ones[0]) and torch.equal(plain[1], ones[1])


def test_the_same_weights_give_the_same_palette_on_any_number_of_threads():
    weight, importance = laplace((ROWS, COLUMNS)), fisher_like((ROWS, COLUMNS))
    threads = torch.get_num_threads()
    try:
        first = fit(weight, importance, 6, 1)
        torch.set_num_threads(1)
        again = fit(weight, importance, 6, 1)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bits,group_size", [(2, 1), (4, 1), (4, 16), (6, 16)])
def test_weighting_never_does_worse_than_plain_k_means_on_the_weighted_error(bits, group_size, seed):
    # Not a theorem (both are local searches), but what a search of the weighted error must show:
    # over 100 seeds of each of these settings, the weighted fit's error stayed under 0.86 of plain's.
    weight, importance = laplace((ROWS, COLUMNS), seed), fisher_like((ROWS, COLUMNS), seed)
    weighted = weighted_error(weight, importance, *fit(weight, importance, bits, group_size), group_size)
    plain = weighted_error(weight, importance, *fit(weight, None, bits, group_size), group_size)
    assert weighted <= plain


def test_weights_that_matter_are_reproduced_almost_exactly():
    weight = laplace((ROWS, COLUMNS))
    importance = torch.ones_like(weight)
    important = torch.zeros_like(weight, dtype=torch.bool)
    important[:, ::16] = True  # 4 a row, 16 table entries a row
    importance[important] = 1e6
    codes, tables = fit(weight, importance, 4, 1)
    error = (dequantize(codes, tables, 1) - weight).abs()
    # An important weight alone among at most COLUMNS others of importance 1 in its cluster has its
    # entry at (1e6 w + sum others) / (1e6 + others), within COLUMNS / 1e6 of the row's range of w;
    # then rounded to fp32.
    spread = (weight.amax(1, keepdim=True) - weight.amin(1, keepdim=True)).expand_as(weight)
    assert (error[important] <= COLUMNS / 1e6 * spread[important] + EPS * weight.abs()[important]).all()
    plain = (dequantize(*fit(weight, None, 4, 1), 1) - weight).abs()
    assert error[important].max() < plain[important].max() / 100


def test_fewer_distinct_weights_than_entries_are_reproduced_exactly():
    weight = torch.tensor([[0.0, 1.0, 2.0] * 4, [-1.0, -1.0, 5.0] * 4])
    codes, tables = fit(weight, None, 4, 1)
    assert torch.equal(dequantize(codes, tables, 1), weight)
    assert torch.isfinite(tables).all()


def test_a_group_of_no_importance_falls_back_to_plain_k_means():
    weight = laplace((ROWS, COLUMNS))
    importance = fisher_like(weight.shape)
    importance[:16] = 0
    codes, tables = fit(weight, importance, 4, 16)
    plain_codes, plain_tables = fit(weight[:16], None, 4, 16)
    assert torch.equal(codes[:16], plain_codes) and torch.equal(tables[:1], plain_tables)


@pytest.mark.parametrize("importance", ["none", "fisher_like"])
def test_well_separated_clusters_each_get_an_entry_however_uneven_their_sizes(importance):
    # 16 clusters a unit apart holding 1 to 31 weights: equal shares of the weights start several
    # entries in the big clusters and none in the small ones, a fixed point of Lloyd's algorithm
    # that the swaps must leave. The optimum is then known: each cluster at its own weighted mean.
    gen = torch.Generator().manual_seed(0)
    cluster = torch.cat([torch.full((1 + 2 * j,), j) for j in range(16)])
    values = cluster + 0.01 * torch.randn(len(cluster), generator=gen)
    importance = torch.ones_like(values) if importance == "none" else fisher_like(values.shape)
    codes, tables = fit(values[None], importance[None], 4, 1)
    v, w = values.double(), importance.double()
    mass = torch.zeros(16, dtype=torch.float64).scatter_add_(0, cluster, w)
    means = torch.zeros(16, dtype=torch.float64).scatter_add_(0, cluster, w * v) / mass
    optimum = float((w * (v - means[cluster]).square()).sum())
    # Its tables rounded to fp32 (each entry within eps * 16 of the mean) add mass * that**2 at most.
    rounding = float(mass.sum()) * (EPS * 16) ** 2
    assert weighted_error(values[None], importance[None], codes, tables, 1) <= optimum + rounding
    assert torch.equal(codes[0].long(), cluster)


@pytest.mark.parametrize("bits,group_size,message", [
    (9, 1, "one a byte"), (0, 1, "one a byte"), (4, 3, "does not tile 32 rows"), (4, 0, "does not tile"),
    (4, True, "does not tile"),
])
def test_impossible_settings_are_refused(bits, group_size, message):
    with pytest.raises(ValueError, match=message):
        fit(laplace((ROWS, COLUMNS)), None, bits, group_size)


def test_bad_importance_is_refused():
    weight = laplace((ROWS, COLUMNS))
    with pytest.raises(ValueError, match="importance"):
        fit(weight, torch.ones(ROWS, COLUMNS + 1), 4, 1)
    with pytest.raises(ValueError, match=">= 0"):
        fit(weight, -torch.ones_like(weight), 4, 1)


# --- as torchao's codebook tensor ----------------------------------------------------------------


class TwoLinears(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.up = nn.Linear(COLUMNS, ROWS, bias=False, dtype=dtype)
        self.down = nn.Linear(ROWS, COLUMNS, dtype=dtype)
        with torch.no_grad():
            self.up.weight.copy_(laplace(self.up.weight.shape, 1))
            self.down.weight.copy_(laplace(self.down.weight.shape, 2))
            self.down.bias.copy_(laplace(self.down.bias.shape, 3))

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def palettized(bits, group_size, dtype=torch.float32):
    model = TwoLinears(dtype)
    for linear in (model.up, model.down):
        weight = linear.weight.detach()
        palettize(linear, *fit(weight, fisher_like(weight.shape), bits, group_size), group_size)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size", [1, 16, None])
def test_the_codebook_tensor_dequantizes_to_the_tables_entries_exactly(group_size, dtype):
    linear = TwoLinears(dtype).up
    codes, tables = fit(linear.weight.detach(), None, 4, group_size)
    palettize(linear, codes, tables, group_size)
    got = linear.weight.dequantize()
    assert got.dtype == dtype and torch.equal(got, dequantize(codes, tables.to(dtype), group_size))


def test_the_export_is_the_plain_paths_table_look_up():
    x = torch.randn(2, COLUMNS)

    def look_ups(model):
        program = torch.export.export(unwrap_tensor_subclass(model), (x,), strict=False)
        nodes = [n for n in program.graph.nodes if n.target == torch.ops.quant.dequantize_codebook.default]
        # codes and codebook as shape and dtype, then nbits, block size and output dtype as they are
        return [(*((tuple(a.meta["val"].shape), a.meta["val"].dtype) for a in n.args[:2]), n.args[2:], n.kwargs)
                for n in nodes], program

    ours, program = look_ups(palettized(6, 16))
    theirs, _ = look_ups(palettize_linears(TwoLinears(), 6, 16))
    # The same look-ups, but for the table's dtype: coremltools' k-means hands back float64 tables,
    # these are in the weight's dtype (the look-up returns that dtype either way).
    float64 = [((c, (shape, torch.float64), *rest)) for c, (shape, _), *rest in ours]
    assert len(ours) == 2 and float64 == theirs
    assert {codebook[1] for _, codebook, *_ in ours} == {torch.float32}
    eager = palettized(6, 16)
    assert torch.equal(program.module()(x), eager(x))


def test_core_ml_takes_the_look_up_as_its_constexpr_lut_to_dense(monkeypatch):
    from coremltools.converters.mil.mil.types import builtin_to_string

    report, luts = lowered_luts(unwrap_tensor_subclass(palettized(6, 16, torch.float16)), COLUMNS, monkeypatch)
    assert report["cpu_ops"] == {} and report["coreml_partitions"] == 1
    assert sorted(op.lut.shape for op in luts) == [(ROWS // 16, 1, 64, 1), (COLUMNS // 16, 1, 64, 1)]
    assert {builtin_to_string(op.indices.dtype) for op in luts} == {"uint6"}


def test_tables_of_a_size_the_neural_engine_does_not_run_are_refused():
    linear = TwoLinears().up
    codes, tables = fit(linear.weight.detach(), None, 3, 1)
    with pytest.raises(ValueError, match="accelerates palettes of"):
        palettize(linear, codes, tables, 1)
    with pytest.raises(ValueError, match="table"):
        palettize(linear, *fit(linear.weight.detach(), None, 4, 1), 16)
