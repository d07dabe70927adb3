"""GPTQ (Frantar et al., 2022): round a linear's weights one input column at a time, and let the
columns not yet rounded absorb each rounding's error as far as the layer's inputs allow.

Why: rounding every weight to its nearest grid point (torchao's ``IntxWeightOnlyConfig``, "round
to nearest") minimises the error of the weights, but what the model feels is the error of the
layer's outputs, ||X W^T - X Wq^T||^2 = tr(E H E^T) with E = W - Wq and H = X^T X. Where inputs
are correlated, an error in one column can largely be cancelled by nudging the others. GPTQ does
that, greedily, and here in the forms the Neural Engine runs:

- ``quantize_per_channel``: int4/int8 with one scale (and optionally a zero point) per output
  channel, the c4w/c8w form (torchao's PerAxis(0)); ``to_torchao`` makes the result the same
  ``IntxUnpackedToInt8Tensor`` torchao makes, so it exports as the same ``dequantize_affine``.
- ``quantize_to_tables``: the same error feedback onto fixed palettes (one look-up table per
  group of rows, e.g. palettize.py's k-means tables): each weight takes the nearest entry of its
  table instead of the nearest grid point.

How: H = xtx + damp * mean(diag(xtx)) * I (xtx may be a sum or a mean over tokens: nothing
depends on H's scale). U is the upper Cholesky factor of H^-1 (H^-1 = U^T U). Rounding column i
leaves a residual r_i; subtracting (r_i / U_ii) * U[i, i+1:] from the later columns is the
least-squares best correction given the columns rounded so far, and by construction the final
error is E = D U with D[:, i] = r_i / U_ii, so the output error is sum_i |r_i|^2 / U_ii^2, where
round to nearest's is tr(E H E^T), sum_i |e_i|^2 H_ii plus cross terms that average out. With
residuals of one size (uniform over a step) GPTQ therefore wins in expectation: 1 / U_ii^2 is
what is left of column i's energy once the columns after it have explained what they can, never
more than H_ii, and equal to it for every i only when H is diagonal. Uncorrelated inputs leave
nothing to feed back: the corrections are exact zeros, and GPTQ rounds as round to nearest does,
bit for bit. Clamping at the grid's ends (a corrected weight pushed past the range) is where the
model fails: it makes GPTQ's residuals larger than half a step.

Act order: columns go in decreasing diag(H), the inputs with the most energy first, while many
columns remain to absorb their error (the paper's fix for outlier-heavy layers). Lazy blocks:
within a block of ``block`` columns each correction is a rank-1 update of the block alone; the
block's corrections to all later columns are one matrix product. The sweep runs on W^T, so a
column is a contiguous row, and on one torch thread (``_one_thread``).

Scales, per row, are fixed before the sweep. By default (``clip=True``) each row takes, of the
clipping ratios CLIP_RATIOS times its min-max range, the one whose round-to-nearest residuals
cost least under GPTQ's own weights, sum_i e_i^2 / U_ii^2. Weighting them by H instead (the
error round to nearest would have) picks scales that suit round to nearest: on SmolLM2's layer
10 it made GPTQ's 8-bit error 1.7x worse, while GPTQ's weights never did worse than min-max and
cut the 4-bit error by 20-43% (held-out text too). ``clip=False`` gives torchao's own min-max scales.

Inputs calibration never saw (diag(xtx) = 0) carry no error information: their weights are
rounded to nearest and kept (GPTQ's reference code zeroes them, which is wrong for inputs merely
rare in the calibration text), and nothing is fed to or from them.
"""

import contextlib

import torch
from torch import nn

# Clipping ratios the scale search tries, 1.0 (min-max) first so that ties keep min-max. On
# SmolLM2's layer 10, 4-bit rows chose 0.6-0.95, a few as low as 0.4; 8-bit rows 1.0.
CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(13))
# Rows the scale search takes at once (_clipped_grid).
ROWS_AT_ONCE = 1024


def quantize_per_channel(weight, xtx, bits, symmetric=True, damp=0.01, block=128, act_order=True, clip=True):
    """GPTQ onto one uniform grid per output channel.

    weight [out, in] and xtx [in, in] (x^T x summed or averaged over calibration tokens), float.
    Returns (qdata int8 [out, in], scale fp32 [out], zero_point int8 [out] or None if symmetric),
    weight ~ (qdata - zero_point) * scale per row, qdata in int{bits}'s [-2^(bits-1), 2^(bits-1) - 1]
    (torchao's range for either mapping: an asymmetric grid shifts by its zero point within it)."""
    weight = _checked(weight, xtx)
    with _one_thread():
        order, upper = _factor(xtx, damp, act_order)
        if clip:
            scale, zero_point = _clipped_grid(weight, bits, symmetric, _gains(order, upper))
        else:
            scale, zero_point = min_max_grid(weight, bits, symmetric)
        codes = _sweep_columns(weight, order, upper, _grid_rounder(scale, zero_point, bits), block)
    return codes.to(torch.int8), scale, (None if symmetric else zero_point)


def quantize_to_tables(weight, xtx, tables, group_size, damp=0.01, block=128, act_order=True):
    """GPTQ onto fixed palettes: rows [g * group_size, (g + 1) * group_size) share ``tables[g]``.

    weight [out, in], xtx [in, in], tables [out // group_size, K] float with K <= 256.
    Returns codes uint8 [out, in]: weight ~ ``sensitive_kmeans.dequantize(codes, tables, group_size)``."""
    weight = _checked(weight, xtx)
    tables = tables.detach().float()
    if tables.dim() != 2 or tables.shape[0] * group_size != weight.shape[0] or tables.shape[1] > 256:
        raise ValueError(f"gptq: tables of shape {list(tables.shape)}, {group_size} rows each, for a weight of "
                         f"{weight.shape[0]} rows; expected them to tile the rows, at most 256 entries each")
    with _one_thread():
        order, upper = _factor(xtx, damp, act_order)
        entries, entry_order = tables.repeat_interleave(group_size, dim=0).sort(dim=1)
        ranks = _sweep_columns(weight, order, upper, _table_rounder(entries), block)
    # Ranks to table indices once at the end rather than a look-up a column.
    return entry_order.gather(1, ranks.long()).to(torch.uint8)


def round_to_nearest(weight, scale, zero_point, bits):
    """qdata int8 [out, in]: each weight on its row's grid, nearest point (what GPTQ is measured against)."""
    codes, _ = _grid_rounder(scale, zero_point, bits)(weight.detach().float().T)
    return codes.T.to(torch.int8)


def dequantize(qdata, scale, zero_point=None):
    """(qdata - zero_point) * scale per row, fp32, in torchao's dequantize_affine's order of operations."""
    shifted = qdata.float() if zero_point is None else qdata.float() - zero_point.float()[:, None]
    return shifted * scale[:, None]


def to_torchao(linear, qdata, scale, zero_point, bits):
    """Give ``linear`` the quantized weight as torchao's ``IntxUnpackedToInt8Tensor``, in place.

    The tensor is what ``IntxWeightOnlyConfig(PerAxis(0))`` builds: one block a row, the scale in
    the weight's dtype shaped [out, 1], an int8 zero point (zeros when symmetric). So
    ``unwrap_tensor_subclass`` and ``torch.export`` give the same ``dequantize_affine``, which
    the Core ML converter turns into its constexpr ops. Returns ``linear``."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    qmin, qmax = int_range(bits)
    if qdata.numel() and (qdata.min() < qmin or qdata.max() > qmax):
        raise ValueError(f"gptq: qdata spans [{qdata.min()}, {qdata.max()}], outside int{bits}'s [{qmin}, {qmax}]")
    dtype, (rows, columns) = linear.weight.dtype, qdata.shape
    zero = torch.zeros(rows, 1, dtype=torch.int8) if zero_point is None else zero_point.to(torch.int8)[:, None]
    tensor = IntxUnpackedToInt8Tensor(qdata.to(torch.int8), scale.to(dtype)[:, None], zero,
                                      getattr(torch, f"int{bits}"), (1, columns), dtype, None)
    linear.weight = nn.Parameter(tensor, requires_grad=False)
    return linear


def int_range(bits):
    """torchao's (qmin, qmax) for int{bits}."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def min_max_grid(weight, bits, symmetric):
    """(scale fp32 [out], zero_point int8 [out]) spanning each row's range, by torchao's own
    per-axis affine choice (the zero points are zeros when symmetric)."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    qmin, qmax = int_range(bits)
    mapping = MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC
    scale, zero_point = choose_qparams_affine(weight, mapping, (1, weight.shape[1]), torch.int8, qmin, qmax,
                                              zero_point_dtype=torch.int8)
    return scale.reshape(-1), zero_point.reshape(-1)


def _checked(weight, xtx):
    weight = weight.detach().float()
    if weight.dim() != 2 or tuple(xtx.shape) != (weight.shape[1],) * 2:
        raise ValueError(f"gptq: xtx of shape {list(xtx.shape)} for a weight of {list(weight.shape)}; "
                         "expected [in, in] for [out, in]")
    return weight


@contextlib.contextmanager
def _one_thread():
    """torch on one thread: the sweep's steps are vectors of one value a row, too small to split,
    and on two cores another job kept busy, two threads made the 49152-row LM head 13x slower
    (20 s instead of 1.5 s). One thread also gives the same sums on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _factor(xtx, damp, act_order):
    """(column order, U of the permuted H) for the sweep."""
    order = _column_order(xtx, act_order)
    return order, _inverse_cholesky(_hessian(xtx, damp)[order][:, order])


def _hessian(xtx, damp):
    """H in float64, damped, with inputs calibration never saw isolated (see the module docstring)."""
    hessian = xtx.detach().to(torch.float64).clone()
    diagonal = hessian.diagonal()
    dead = diagonal <= 0
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    mean = diagonal[~dead].mean() if (~dead).any() else torch.tensor(1.0, dtype=torch.float64)
    # Any positive value isolates a dead input; the mean, not 1, keeps it on H's scale.
    diagonal[dead] = mean
    diagonal += damp * mean
    return hessian


def _column_order(xtx, act_order):
    """The order columns are rounded in: decreasing energy (act order; dead inputs last), or as they come."""
    if not act_order:
        return torch.arange(xtx.shape[0])
    # Stable: equal energies keep their order, the same codes on any machine.
    return torch.sort(xtx.diagonal().to(torch.float64), descending=True, stable=True).indices


def _inverse_cholesky(hessian):
    """U upper triangular with H^-1 = U^T U, fp32 (found in float64: calibration H is ill-conditioned)."""
    lower, info = torch.linalg.cholesky_ex(hessian)
    if info:
        raise ValueError("gptq: the damped Hessian is not positive definite; raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()


def _gains(order, upper):
    """1 / U_ii^2 in the weight's column order: what a residual in column i costs once GPTQ has
    fed it forward."""
    gains = torch.empty_like(upper[0])
    gains[order] = upper.diagonal().pow(-2)
    return gains


def _clipped_grid(weight, bits, symmetric, gains):
    """min_max_grid of the weight shrunk by the CLIP_RATIOS ratio that costs each row least."""
    # Rows are independent; slices of ROWS_AT_ONCE keep the temporaries in cache: the LM head's
    # 49152 rows at once took 9 s, mostly streaming memory, in slices 2.4 s.
    grids = [_clipped_rows(rows, bits, symmetric, gains) for rows in weight.split(ROWS_AT_ONCE)]
    return torch.cat([scale for scale, _ in grids]), torch.cat([zero_point for _, zero_point in grids])


def _clipped_rows(weight, bits, symmetric, gains):
    """_clipped_grid of some rows: each ratio's grid, round to nearest, the cheapest so far kept."""
    best, weight_t = None, weight.T.contiguous()  # rounded as the sweep rounds: a row per input column
    for ratio in CLIP_RATIOS:
        scale, zero_point = min_max_grid(weight * ratio, bits, symmetric)
        _, values = _grid_rounder(scale, zero_point, bits)(weight_t)
        cost = gains @ (weight_t - values).square()
        if best is None:
            best = cost, scale, zero_point
            continue
        better = cost < best[0]
        best = tuple(torch.where(better, new, old) for new, old in zip((cost, scale, zero_point), best))
    return best[1], best[2]


def _grid_rounder(scale, zero_point, bits):
    """values [..., out] -> (codes, what they dequantize to), each on its row's grid; torchao's
    quantize_affine arithmetic, so that round to nearest gives torchao's codes."""
    qmin, qmax = int_range(bits)
    inverse = 1.0 / scale
    zero_point = torch.zeros_like(scale) if zero_point is None else zero_point.float()

    def rounder(values):
        codes = torch.clamp(torch.round(values * inverse) + zero_point, qmin, qmax)
        return codes, (codes - zero_point) * scale

    return rounder


def _table_rounder(entries):
    """values [out] -> (the rank of the nearest of each row's sorted ``entries``, the entry); a value
    halfway between two entries takes the lower one."""
    # A binary search among the midpoints between neighbouring entries, not K comparisons a weight.
    midpoints = ((entries[:, 1:] + entries[:, :-1]) / 2).contiguous()

    def rounder(values):
        rank = torch.searchsorted(midpoints, values[:, None])
        return rank.squeeze(1), entries.gather(1, rank).squeeze(1)

    return rounder


def _sweep_columns(weight, order, upper, rounder, block):
    """The column sweep in ``order``; returns rounder's codes [out, in] (floats) in the weight's order."""
    codes = _sweep(weight[:, order].T.contiguous(), upper, rounder, block)
    return codes[torch.argsort(order)].T


def _sweep(weight_t, upper, rounder, block):
    """Round the rows of ``weight_t`` ([in, out]: one row per input column) in turn, feeding each
    one's error forward (updates ``weight_t`` in place). Returns the codes [in, out]."""
    columns = weight_t.shape[0]
    codes = torch.empty_like(weight_t)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        errors = _sweep_block(weight_t[start:end], upper[start:end, start:end], rounder, codes[start:end])
        # The block's effect on every later column at once, one matrix product.
        weight_t[end:].addmm_(upper[start:end, end:].T, errors, alpha=-1)
    return codes


def _sweep_block(weight_t, upper, rounder, codes):
    """One block, in place: round each column, correct the block's later ones. Returns D [block, out],
    each column's residual over U_ii, which the later blocks' correction needs."""
    errors = torch.empty_like(weight_t)
    for i in range(weight_t.shape[0]):
        codes[i], values = rounder(weight_t[i])
        errors[i] = (weight_t[i] - values) / upper[i, i]
        weight_t[i + 1:].addr_(upper[i, i + 1:], errors[i], alpha=-1)
    return errors
