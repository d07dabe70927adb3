"""A tiny random Llama in canonical (Meta) form, made in-process for tests."""

import torch

from ane_build.checkpoint import canonical


def tiny_params(**overrides):
    params = {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
        "hidden_dim": 128, "vocab_size": 320, "norm_eps": 1e-5, "rope_theta": 10000.0,
        "use_scaled_rope": False,
    }
    params.update(overrides)
    return params


def tiny_weights(params, seed=0):
    """Random weights for ``params``; norms near 1 so activations stay in a sane range."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in canonical.expected_shapes(params).items():
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            weights[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    return weights
