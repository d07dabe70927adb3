"""Palettes fitted to what the loss cares about: k-means weighted by each weight's importance.

Why: a plain k-means palette (``palettize.py``) minimises squared error, so the rare weights the
output depends on most share clusters with many harmless ones. SqueezeLLM weighs each weight's
squared error by its Fisher information (``calibration.statistics``): the fit then minimises
sum(F * (w - table[code])**2), the second-order estimate of the loss the palette adds, and spends
table values on the weights that matter. With no importance (or all ones) it is plain k-means.

How: k-means in one dimension, every group of ``group_size`` output rows (one table each, as
``palettize.py``'s groups) at once, in torch. In one dimension a cluster is an interval of the
sorted values, so each group is sorted once, and running sums of importance, importance * value
and importance * value**2 give any interval's weighted mean and error from two look-ups: a step
costs a binary search per table entry, not a pass over the weights.

- Tables start at the weighted quantiles (equal shares of importance between them) and Lloyd's
  algorithm moves them to a fixed point (or ``iterations`` steps).
- Lloyd's fixed points from there are poor when importance is uneven: a table value held by one
  heavy weight never leaves it for many light ones. On rows of SmolLM2-135M, with their Fisher
  diagonal or none, they came out at 1.5 to 3.5 times the optimum's error (exact dynamic
  programming on small groups), scikit-learn's k-means++ (coremltools' path) at 1.1 to 1.2.
  So swaps follow, as in swap-based k-means: in each group the two neighbours cheapest to merge
  give up a table value to the cluster whose cut in two gains most, while that lowers the error.
  That ends at 1.05 to 1.07 times the optimum on the same rows, for about as many more Lloyd steps.
- A table value left with no weight takes the weight the table serves worst.

Everything is deterministic (sorts are stable, no random starts): the same weights and importance
give the same palette on any number of threads.

``palettize`` then makes a linear's weight the torchao ``CodebookQuantizedTensor`` the plain
path makes, from these codes and tables instead of coremltools' k-means, so the exported program
holds the same ``quant.dequantize_codebook`` that Core ML lowers to ``constexpr_lut_to_dense``.
"""

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ane_build.quant import palettize as plain

# At most this many Lloyd steps to a fixed point, and as many swap rounds (SmolLM2's weights need
# tens of each).
ITERATIONS = 300
# Groups fitted together at most this many weights at a time: the float64 running sums and their
# temporaries take some 200 bytes a weight (a whole LM head, 49152 x 576, would take 5 GB), and
# larger chunks were no faster on SmolLM2's weights.
CHUNK = 1 << 20


def fit(weight, importance, bits, group_size, iterations=ITERATIONS):
    """(codes uint8 [out, in], tables float32 [out // group_size, 2**bits]) minimising
    sum(importance * (weight - tables[group, codes])**2), each group of ``group_size`` rows (None:
    all of them) sharing a table sorted ascending. ``importance``: [out, in], >= 0, or None."""
    out, columns = weight.shape
    rows = _check(weight, importance, bits, group_size)
    values = weight.detach().float().reshape(out // rows, rows * columns)
    weights = _group_importance(importance, values)
    codes, tables = [], []
    step = max(1, CHUNK // values.shape[1])
    for start in range(0, values.shape[0], step):
        chunk = slice(start, start + step)
        c, t = _fit_groups(values[chunk], weights[chunk], 2**bits, iterations)
        codes.append(c.to(torch.uint8))  # a byte a code at once: an LM head's int64 codes take 0.2 GB
        tables.append(t)
    return torch.cat(codes).reshape(out, columns), torch.cat(tables)


def dequantize(codes, tables, group_size):
    """The weight ``codes`` and ``tables`` stand for: tables[group of the row, code]."""
    out, columns = codes.shape
    rows = group_size or out
    grouped = codes.long().reshape(tables.shape[0], rows * columns)
    return tables.gather(1, grouped).reshape(out, columns)


def weighted_error(weight, importance, codes, tables, group_size):
    """sum(importance * (weight - dequantized)**2) in float64 (importance None: plain squared error)."""
    error = (weight.double() - dequantize(codes, tables, group_size).double()).square()
    return float(error.sum() if importance is None else (importance.double() * error).sum())


def _check(weight, importance, bits, group_size):
    """The rows a table covers; refuses what would fail (or mislead) deep inside."""
    if weight.dim() != 2:
        raise ValueError(f"sensitive k-means: a [out, in] weight, got shape {tuple(weight.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"sensitive k-means: {bits} bits; codes are stored one a byte (1 to 8 bits)")
    rows = weight.shape[0] if group_size is None else group_size
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1 or weight.shape[0] % rows:
        raise ValueError(f"sensitive k-means: group_size={group_size!r} does not tile {weight.shape[0]} rows")
    if importance is not None:
        if importance.shape != weight.shape:
            raise ValueError(f"sensitive k-means: importance {tuple(importance.shape)} for a weight "
                             f"{tuple(weight.shape)}")
        if not bool(torch.isfinite(importance).all() and (importance >= 0).all()):
            raise ValueError("sensitive k-means: importance must be finite and >= 0")
    return rows


def _group_importance(importance, values):
    """Importance laid out as ``values``' groups; a group none of whose weights matter weighs them
    equally (any table would do: plain k-means is the sensible one). Not rescaled: float64 running
    sums hold any fp32 importance, and rescaling would round it."""
    if importance is None:
        return torch.ones_like(values)
    weights = importance.detach().float().reshape(values.shape)
    weighed = weights.sum(1, keepdim=True) > 0
    return weights if bool(weighed.all()) else torch.where(weighed, weights, 1.0)


class _Sorted(NamedTuple):
    """A chunk of groups, each sorted by value, with the running sums that price any interval."""

    values: torch.Tensor  # [groups, n], ascending
    weights: torch.Tensor  # their importance, in the same order
    mass: torch.Tensor  # [groups, n + 1] float64: importance summed over values [0, i)
    moment: torch.Tensor  # the same of importance * value
    square: torch.Tensor  # and of importance * value**2


def _fit_groups(values, weights, k, iterations):
    """Codes and sorted tables of ``k`` entries for each row of ``values`` [groups, n]."""
    order = _stable_order(values)
    data = _sort(values, weights, order)
    tables = _lloyd(data, _weighted_quantiles(data, k), iterations)
    tables = _lloyd(data, _swap_while_better(data, tables, iterations), iterations)
    # The sorted values' codes put back in the weights' order: the same as a search for each value.
    return torch.empty_like(order).scatter_(1, order, _sorted_codes(data, tables)), tables


def _stable_order(values):
    """``values.sort(dim=1, stable=True).indices`` (float32 values, no NaN), five times faster on
    SmolLM2's groups: numpy's vectorised sort of int64 keys, each a value's bits made to order as the
    value does, then its position (so keys are unique: any sort is stable)."""
    n = values.shape[1]
    shift = max(1, (n - 1).bit_length())
    bits = (values + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, which it equals
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # a negative float's lower bits grow with its magnitude
    keys = (bits.long() << shift) | torch.arange(n)
    return torch.from_numpy(np.sort(keys.numpy(), axis=1)) & ((1 << shift) - 1)


def _sort(values, weights, order):
    ordered, ordered_weights = values.gather(1, order), weights.gather(1, order)
    w, x = ordered_weights.double(), ordered.double()
    return _Sorted(ordered, ordered_weights, *(_running_sum(t) for t in (w, w * x, w * x * x)))


def _running_sum(terms):
    return torch.cat((torch.zeros(terms.shape[0], 1, dtype=terms.dtype), terms.cumsum(1)), 1)


def _between(cumulative, starts, ends):
    """Sums over the sorted values [starts, ends) from a running sum."""
    return cumulative.gather(1, ends) - cumulative.gather(1, starts)


def _weighted_quantiles(data, k):
    """The values at the middle of k equal shares of each group's importance."""
    levels = (torch.arange(k, dtype=torch.float64) + 0.5) / k * data.mass[:, -1:]
    at = torch.searchsorted(data.mass[:, 1:].contiguous(), levels.contiguous())
    return data.values.gather(1, at.clamp_(max=data.values.shape[1] - 1))


def _lloyd(data, tables, iterations):
    for _ in range(iterations):
        updated = _lloyd_step(data, tables)
        if torch.equal(updated, tables):
            break
        tables = updated
    return tables


def _lloyd_step(data, tables):
    """Each table entry moved to the weighted mean of the values nearest it; an entry with no
    weight re-seeded where the table serves worst. Sorted."""
    starts, ends = _intervals(data.values, tables)
    mass = _between(data.mass, starts, ends)
    means = _mean(data, starts, ends, mass).float()
    updated = torch.where(mass > 0, means, tables)
    if bool((mass <= 0).any()):
        updated = _reseed(data, updated, mass <= 0)
    return updated.sort(dim=1).values


def _mean(data, starts, ends, mass):
    """Weighted means (float64) of the sorted values [starts, ends), where mass > 0."""
    last = data.values.shape[1] - 1
    mean = _between(data.moment, starts, ends) / mass.clamp_min(1e-300)
    # A mean lies within its interval; the running sums' rounding must not take it outside.
    low = data.values.gather(1, starts.clamp(max=last)).double()
    high = data.values.gather(1, (ends - 1).clamp(min=0)).double()
    return torch.minimum(torch.maximum(mean, low), high)


def _intervals(ordered, tables):
    """[start, end) of the sorted values nearest each (sorted) table entry (``_cuts``)."""
    cuts = _cuts(ordered, tables)
    edge = torch.zeros(ordered.shape[0], 1, dtype=cuts.dtype)
    return torch.cat((edge, cuts), 1), torch.cat((cuts, edge + ordered.shape[1]), 1)


def _cuts(ordered, tables):
    """Where the midpoints between neighbouring (sorted) table entries fall among the sorted values:
    the values before a cut are nearer the entries below it; a value exactly halfway goes up."""
    return torch.searchsorted(ordered, _midpoints(tables))


def _midpoints(tables):
    return ((tables[:, 1:] + tables[:, :-1]) / 2).contiguous()


def _sorted_codes(data, tables):
    """The code of each sorted value: the index of its nearest entry in its group's sorted table, a
    value exactly halfway taking the upper one. The j-th value's is the number of ``_cuts`` at or
    before j: a pass over the values rather than a binary search for each."""
    cuts = _cuts(data.values, tables)
    marks = torch.zeros(data.mass.shape, dtype=cuts.dtype).scatter_add_(1, cuts, torch.ones_like(cuts))
    return marks[:, :-1].cumsum(1)


def _errors(data, tables):
    """Each sorted value's weighted squared error under ``tables``."""
    return data.weights * (data.values - tables.gather(1, _sorted_codes(data, tables))).square()


def _reseed(data, tables, empty):
    """Empty entries moved onto the values the table serves worst (largest weighted error), the
    j-th empty entry of a group onto its j-th worst value; kept where every value is served
    exactly. Moving an entry no value uses changes nothing; the value it lands on then costs 0."""
    worst_error, worst_at = _errors(data, tables).topk(min(tables.shape[1], data.values.shape[1]), dim=1)
    rank = empty.long().cumsum(1) - 1
    pick = rank.clamp(0, worst_at.shape[1] - 1)
    seed = data.values.gather(1, worst_at.gather(1, pick))
    reseed = empty & (rank < worst_at.shape[1]) & (worst_error.gather(1, pick) > 0)
    return torch.where(reseed, seed, tables)


# --- leaving Lloyd's local optima ------------------------------------------------------------------


def _swap_while_better(data, tables, rounds):
    """Swap rounds: per group, the best split and the cheapest merge (``_swap``), one Lloyd step,
    kept if the group's error fell. A group stops at its first swap that does not help (the next
    round would propose the same), and each round works on the groups still improving only."""
    tables = tables.clone()
    rows = torch.arange(tables.shape[0])  # the groups still improving, as rows of ``tables``
    error = _total_error(data, tables)
    for _ in range(rounds):
        proposal, promising = _swap(data, tables[rows])
        data, rows, proposal, error = _keep(promising, data, rows, proposal, error)
        candidate = _lloyd_step(data, proposal)
        candidate_error = _total_error(data, candidate)
        data, rows, candidate, error = _keep(candidate_error < error, data, rows, candidate, candidate_error)
        tables[rows] = candidate
        if rows.numel() == 0:
            break
    return tables


def _keep(mask, data, *tensors):
    """``data`` and each tensor cut to the groups (rows) ``mask`` keeps; as they are where it keeps
    them all (most rounds): copying the sorted data costs more than the round's own work."""
    if bool(mask.all()):
        return data, *tensors
    rows = mask.nonzero().squeeze(1)
    return _Sorted(*(t[rows] for t in data)), *(t[rows] for t in tensors)


def _total_error(data, tables):
    """Each group's weighted squared error, from the running sums: sum w (x - t)**2 over a cluster is
    sum w x**2 - 2 t sum w x + t**2 sum w. O(table) rather than O(weights); float64 keeps the
    cancellation ~1e-12 of the group's sum w x**2, far below any swap worth making."""
    starts, ends = _intervals(data.values, tables)
    t = tables.double()
    mass, moment, square = (_between(c, starts, ends) for c in (data.mass, data.moment, data.square))
    return (square - 2 * t * moment + t.square() * mass).clamp_min(0).sum(1)


def _swap(data, tables):
    """(tables with each group's best split and cheapest merge applied, whether the split gains more
    than the merge costs). Apart, their changes to the error add up exactly."""
    starts, ends = _intervals(data.values, tables)
    mass = _between(data.mass, starts, ends)
    gain, cluster, left, right = _best_split(data, starts, ends)
    cost, pair, merged = _cheapest_merge(tables, mass, cluster)
    swapped = tables.double()
    swapped.scatter_(1, pair, merged)
    swapped.scatter_(1, pair + 1, right)
    swapped.scatter_(1, cluster, left)
    return swapped.float().sort(dim=1).values, gain[:, 0] > cost[:, 0]


def _best_split(data, starts, ends):
    """Per group, (gain [g, 1], cluster [g, 1], left mean, right mean) of the best cut of one
    cluster in two at its mean (the gain: ``_joining_cost`` of the halves).
    (Cut at the mean only, not at every value: a round then costs about a Lloyd step, and trying
    every value or the importance's quartiles as well gained ~1% of error on SmolLM2's weights.)"""
    mass = _between(data.mass, starts, ends)
    cut = torch.searchsorted(data.values, _mean(data, starts, ends, mass).float().contiguous())
    cut = torch.minimum(torch.maximum(cut, starts + 1), ends - 1).clamp_(min=0)
    left_mass, right_mass = _between(data.mass, starts, cut), _between(data.mass, cut, ends)
    left, right = _mean(data, starts, cut, left_mass), _mean(data, cut, ends, right_mass)
    best, cluster = _joining_cost(left_mass, right_mass, left, right).max(1, keepdim=True)
    return best, cluster, left.gather(1, cluster), right.gather(1, cluster)


def _cheapest_merge(tables, mass, split):
    """Per group, (cost [g, 1], first entry of the pair [g, 1], merged mean) of the neighbours whose
    merging raises the error least (``_joining_cost``, the entries standing for their clusters'
    means), leaving out the pairs holding the cluster ``split`` cuts (their changes would not add up)."""
    t = tables.double()
    cost = _joining_cost(mass[:, :-1], mass[:, 1:], t[:, :-1], t[:, 1:])
    total = mass[:, :-1] + mass[:, 1:]
    pair = torch.arange(tables.shape[1] - 1)
    cost = torch.where((pair == split) | (pair + 1 == split), torch.inf, cost)
    cheapest, first = cost.min(1, keepdim=True)
    a, b, m = t.gather(1, first), t.gather(1, first + 1), total.gather(1, first)
    merged = torch.where(m > 0, (mass.gather(1, first) * a + mass.gather(1, first + 1) * b) / m.clamp_min(1e-300), a)
    return cheapest, first, merged


def _joining_cost(mass_a, mass_b, mean_a, mean_b):
    """What serving two clusters by one entry at their joint mean adds to the error (so also what
    cutting one in two saves): m_a m_b / (m_a + m_b) (mean_a - mean_b)**2; 0 where one is empty."""
    total = (mass_a + mass_b).clamp_min(1e-300)
    return torch.where((mass_a > 0) & (mass_b > 0), mass_a * mass_b / total * (mean_a - mean_b).square(), 0.0)


def palettize(linear, codes, tables, group_size):
    """Make ``linear``'s weight torchao's codebook tensor of ``codes`` and ``tables`` (``fit``'s, one
    table per ``group_size`` rows; None: one table), as ``palettize.palettize_linears`` would with
    its own k-means. Returns ``linear``."""
    from torchao.prototype.quantization.codebook_coreml import CodebookQuantizedTensor

    weight = linear.weight
    bits = _palette_bits(tables)
    rows = weight.shape[0] if group_size is None else group_size
    if codes.shape != weight.shape or tables.shape[0] * rows != weight.shape[0]:
        raise ValueError(f"palettize: codes {tuple(codes.shape)} and {tables.shape[0]} table(s) of "
                         f"{rows} rows for a weight {tuple(weight.shape)}")
    # torchao's layout for row groups: [tables, 1, entries, 1] (one group along the columns, and
    # scalar entries), in the weight's dtype as coremltools' k-means returns it.
    codebook = tables.to(weight.dtype).reshape(tables.shape[0], 1, tables.shape[1], 1)
    quantized = CodebookQuantizedTensor(codes.to(torch.uint8).contiguous(), codebook, plain.code_dtype(bits),
                                        plain.block_size(group_size), weight.shape, dtype=weight.dtype)
    linear.weight = nn.Parameter(quantized, requires_grad=False)
    return linear


def _palette_bits(tables):
    bits = tables.shape[1].bit_length() - 1
    if bits not in plain.BITS or tables.shape[1] != 2**bits:
        raise ValueError(f"palettize: tables of {tables.shape[1]} entries; the Neural Engine accelerates "
                         f"palettes of {', '.join(str(2**b) for b in plain.BITS)}")
    return bits
