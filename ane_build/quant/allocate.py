"""Mixed precision under a size budget: each linear's kind, chosen to keep the weights within
``quantize.budget_mb`` at the least estimated KL divergence.

Each layer's options are (kind, bytes, estimated KLD) from ``calibrated.fit``; the estimates add
across layers (the Fisher diagonal's approximation ignores their interactions). Every layer starts
at its largest option, and the step that adds the least estimated KLD per byte it saves is taken,
again and again, until the weights fit: the greedy answer to this multiple-choice knapsack, which
is optimal whenever each layer's options lie on a convex curve of bytes against error, as
quantization's do (each bit halves a layer's error, roughly).
"""


def allocate(options, budget_bytes):
    """{layer: chosen option} from ``options`` {layer: [option with .bytes and .estimated_kld]} whose
    bytes sum to at most ``budget_bytes``, or None when even the smallest options do not fit."""
    if sum(min(o.bytes for o in opts) for opts in options.values()) > budget_bytes:
        return None
    chosen = {layer: max(opts, key=lambda o: (o.bytes, -o.estimated_kld)) for layer, opts in options.items()}
    total = sum(o.bytes for o in chosen.values())
    while total > budget_bytes:
        layer, step = min(((layer, _cheapest_step(chosen[layer], opts)) for layer, opts in options.items()),
                          key=lambda pair: pair[1][0])
        total -= chosen[layer].bytes - step[1].bytes
        chosen[layer] = step[1]
    return chosen


def _cheapest_step(current, opts):
    """(estimated KLD added per byte saved, option) of the best smaller option than ``current``;
    (inf, None) when there is none."""
    steps = [(max(o.estimated_kld - current.estimated_kld, 0.0) / (current.bytes - o.bytes), o)
             for o in opts if o.bytes < current.bytes]
    return min(steps, key=lambda s: s[0], default=(float("inf"), None))
