import itertools
import random

from ane_build.quant.allocate import allocate
from ane_build.quant.calibrated import Fitted


def option(kind, size, kld):
    return Fitted(kind, size, kld, codes=())


def convex_layers(seed, n_layers=5):
    """Layers whose options cost error as quantization does: each bit taken away multiplies it."""
    rng = random.Random(seed)
    layers = {}
    for i in range(n_layers):
        params, sensitivity = rng.randint(100, 1000), rng.uniform(0.01, 1.0)
        layers[f"layer{i}"] = [option(f"{bits}b", params * bits // 8, sensitivity * 4.0 ** -bits)
                               for bits in (8, 6, 4)]
    return layers


def test_the_chosen_kinds_fit_the_budget_and_start_from_the_largest():
    layers = convex_layers(0)
    largest = sum(max(o.bytes for o in opts) for opts in layers.values())
    assert all(o.kind == "8b" for o in allocate(layers, largest).values())
    for budget in (largest * 0.9, largest * 0.7, largest * 0.55):
        chosen = allocate(layers, budget)
        assert sum(o.bytes for o in chosen.values()) <= budget


def test_no_allocation_of_as_few_bytes_has_less_estimated_error():
    """On convex options each greedy step is the best trade there is, so the result is optimal among all
    allocations of at most its own size (checked against every one of the 3**5)."""
    for seed in range(20):
        layers = convex_layers(seed)
        largest = sum(max(o.bytes for o in opts) for opts in layers.values())
        chosen = allocate(layers, largest * random.Random(seed).uniform(0.5, 0.95))
        size, error = sum(o.bytes for o in chosen.values()), sum(o.estimated_kld for o in chosen.values())
        for combination in itertools.product(*layers.values()):
            if sum(o.bytes for o in combination) <= size:
                assert sum(o.estimated_kld for o in combination) >= error * (1 - 1e-12)


def test_the_most_sensitive_layer_keeps_the_most_bits():
    layers = {"sensitive": [option("8b", 100, 1e-4), option("4b", 50, 1.0)],
              "robust": [option("8b", 100, 1e-4), option("4b", 50, 1e-3)]}
    assert {name: o.kind for name, o in allocate(layers, 150).items()} == {"sensitive": "8b", "robust": "4b"}


def test_a_budget_below_the_smallest_options_is_none():
    layers = convex_layers(1)
    smallest = sum(min(o.bytes for o in opts) for opts in layers.values())
    assert allocate(layers, smallest - 1) is None
    assert allocate(layers, smallest) is not None
