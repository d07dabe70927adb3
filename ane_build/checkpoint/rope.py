"""What a checkpoint's rotary-embedding parameters mean: the inverse frequency of each rotary pair,
with Llama 3.x's long-context scaling when the params ask for it."""

import math

import torch

from ane_build.checkpoint import canonical


def rope_frequencies(params):
    """Inverse frequencies per rotary pair, with Llama 3.x scaling when params ask for it."""
    hd = canonical.head_dim(params)
    inv = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if params.get("use_scaled_rope"):
        inv = _llama3_scaled(inv, params.get("rope_scale_factor", 8), params.get("high_freq_factor", 4))
    return inv


def _llama3_scaled(inv, factor, high_freq_factor, low_freq_factor=1.0, original_context=8192):
    wavelen = 2 * math.pi / inv
    low_wavelen = original_context / low_freq_factor
    high_wavelen = original_context / high_freq_factor
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen < high_wavelen, inv, torch.where(wavelen > low_wavelen, inv / factor, mid))
