import math

import pytest
import torch

from ane_build.checkpoint import canonical
from ane_build.checkpoint.rope import rope_frequencies
from ane_build.model import rewrites
from ane_build.model.ane_llama import MASK_MIN, AneLlama, SlidingCache, attention_mask, rope_table, rotary_rows, rotate
from ane_build.model.reference import ReferenceLlama, apply_rope, rms_norm
from tests import float_bounds
from tests.tiny_llama import tiny_params, tiny_weights

MAX_SEQ = 40
SEQ = 8
SPLIT = {"dtype": "fp32", "target_split_size": 32, "max_splits": 4}

VARIANTS = {
    "gqa": {},
    "mha": {"n_kv_heads": 4},
    "mqa": {"n_kv_heads": 1},
    "llama3_rope": {"use_scaled_rope": True, "rope_scale_factor": 8, "high_freq_factor": 4,
                    "rope_theta": 500000.0},
}


def masked_reference(params, weights, tokens, allowed):
    """ReferenceLlama's math over a whole sequence with any visibility (allowed[t, s]: t sees s).

    Positions stay absolute, so a windowed attention is this with a banded ``allowed``.
    """
    p, w = params, {k: v.double() for k, v in weights.items()}
    n_heads, n_kv, hd = p["n_heads"], p.get("n_kv_heads") or p["n_heads"], canonical.head_dim(p)
    angles = torch.outer(torch.arange(len(tokens), dtype=torch.float64), rope_frequencies(p))
    cos, sin = angles.cos(), angles.sin()
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    h = w["tok_embeddings.weight"][torch.tensor(tokens)][None]
    for i in range(p["n_layers"]):
        lw = lambda name: w[f"layers.{i}.{name}.weight"]  # noqa: E731
        x = rms_norm(h, lw("attention_norm"), p["norm_eps"])
        q = apply_rope((x @ lw("attention.wq").T).unflatten(-1, (n_heads, hd)), cos, sin)
        k = apply_rope((x @ lw("attention.wk").T).unflatten(-1, (n_kv, hd)), cos, sin)
        v = (x @ lw("attention.wv").T).unflatten(-1, (n_kv, hd))
        k, v = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + bias
        h = h + torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).flatten(-2) @ lw("attention.wo").T
        x = rms_norm(h, lw("ffn_norm"), p["norm_eps"])
        h = h + (torch.nn.functional.silu(x @ lw("feed_forward.w1").T) * (x @ lw("feed_forward.w3").T)) \
            @ lw("feed_forward.w2").T
    return (rms_norm(h, w["norm.weight"], p["norm_eps"]) @ w["output.weight"].T)[0]


def windowed(calls, cache_size):
    """Visibility of a run of calls [(start, n, seq_length)].

    A call sees the cache_size tokens before it, and its own tokens causally."""
    total = calls[-1][0] + calls[-1][1]
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for start, n, _ in calls:
        for t in range(start, start + n):
            allowed[t, max(0, start - cache_size):t + 1] = True
    return allowed


def rewritten(params, weights, ane=SPLIT):
    return rewrites.apply(AneLlama.from_weights(params, weights), ane)


def tokens_for(params, n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, params["vocab_size"], (n,), generator=gen).tolist()


def test_masked_reference_with_causal_visibility_is_the_reference():
    params = tiny_params()
    weights = tiny_weights(params)
    tokens = tokens_for(params, 12)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    expected = ReferenceLlama(params, weights)(torch.tensor([tokens]))[0]
    # fp64 against fp32 on the same ops: only the fp32 side's rounding, 3e-6 (see TINY_FP32_ATOL).
    torch.testing.assert_close(masked_reference(params, weights, tokens, causal).float(), expected,
                               atol=1e-5, rtol=0)


def test_parameter_names_are_the_canonical_checkpoint_names():
    params = tiny_params()
    model = AneLlama(params)
    assert set(model.state_dict()) == set(canonical.expected_shapes(params))
    weights = tiny_weights(params)
    del weights["norm.weight"]
    with pytest.raises(RuntimeError, match="norm.weight"):
        model.load_state_dict(weights, strict=True, assign=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("use_cache_list", [True, False])
@pytest.mark.parametrize("n_real", [SEQ, 5])
def test_prefill_matches_reference(variant, use_cache_list, n_real):
    params = tiny_params(**VARIANTS[variant])
    weights = tiny_weights(params)
    tokens = tokens_for(params, n_real)
    cache = SlidingCache(params, MAX_SEQ, SEQ, use_cache_list=use_cache_list)
    logits = cache.step(rewritten(params, weights), tokens)
    expected = ReferenceLlama(params, weights)(torch.tensor([tokens]))[0, -1]
    assert logits.shape == (1, params["vocab_size"])
    torch.testing.assert_close(logits[0], expected, atol=float_bounds.TINY_FP32_ATOL, rtol=0)


def run_decode(model, cache, prompt, n_new):
    """Greedy generation: a 6-token prefill (padded to SEQ), a full SEQ-token chunk, then 1-token
    calls alternating between seq_length 1 and a padded SEQ.

    Returns the tokens, the calls [(start, n, seq_length)] and each call's logits."""
    tokens, calls = list(prompt), [(0, 6, SEQ), (6, 8, SEQ)]
    outputs = replay(model, cache, tokens, calls)
    for i in range(n_new):
        tokens.append(int(outputs[-1].argmax()))
        calls.append((cache.pos, 1, 1 if i % 2 else SEQ))
        outputs += replay(model, cache, tokens, calls[-1:])
    return tokens, calls, outputs


def replay(model, cache, tokens, calls):
    return [cache.step(model, tokens[s:s + n], seq_length)[0].float() for s, n, seq_length in calls]


@pytest.mark.parametrize("variant", ["gqa", "llama3_rope"])
@pytest.mark.parametrize("use_cache_list", [True, False])
def test_decode_past_cache_size_matches_windowed_reference(variant, use_cache_list):
    params = tiny_params(**VARIANTS[variant])
    weights = tiny_weights(params)
    cache_size = 10
    cache = SlidingCache(params, MAX_SEQ, SEQ, cache_size=cache_size, use_cache_list=use_cache_list)
    tokens, calls, outputs = run_decode(rewritten(params, weights), cache, tokens_for(params, 14), 16)
    assert cache.pos == 30 > 2 * cache_size  # the ring wrapped: the oldest entries were evicted
    expected = masked_reference(params, weights, tokens, windowed(calls, cache_size)).float()
    for (start, n, _), logits in zip(calls, outputs):
        torch.testing.assert_close(logits, expected[start + n - 1], atol=float_bounds.TINY_FP32_ATOL, rtol=0)
    # The window matters: full causal attention gives different logits once tokens are evicted.
    causal = torch.ones(30, 30, dtype=torch.bool).tril()
    full = masked_reference(params, weights, tokens, causal)
    assert (full[-1].float() - outputs[-1]).abs().max() > 1e-3


def test_fp16_model_is_finite_and_agrees_with_fp32_on_top1():
    params = tiny_params()
    weights = tiny_weights(params)
    cache32 = SlidingCache(params, MAX_SEQ, SEQ, cache_size=12)
    tokens, calls, out32 = run_decode(rewritten(params, weights), cache32, tokens_for(params, 14), 16)
    # Teacher-forced on the fp32 run's tokens, so every call compares like for like.
    cache16 = SlidingCache(params, MAX_SEQ, SEQ, cache_size=12, dtype=torch.float16)
    out16 = replay(rewritten(params, weights, dict(SPLIT, dtype="fp16")), cache16, tokens, calls)
    assert all(torch.isfinite(o).all() for o in out16)
    agree = sum(int(a.argmax() == b.argmax()) for a, b in zip(out32, out16))
    assert agree >= 0.9 * len(calls)


@pytest.mark.parametrize("seq_length", [SEQ, 1])
@pytest.mark.parametrize("use_cache_list", [True, False])
def test_exports_without_data_dependent_positions(seq_length, use_cache_list):
    params = tiny_params()
    model = rewritten(params, tiny_weights(params), dict(SPLIT, dtype="fp16"))
    cache = SlidingCache(params, MAX_SEQ, SEQ, use_cache_list=use_cache_list, dtype=torch.float16)
    cache.pos = 3
    inputs = cache.inputs([5], seq_length)
    program = torch.export.export(model, inputs, strict=False)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "_local_scalar_dense" in t or "item" in t]
    assert not program.range_constraints  # no symbolic sizes at all: every shape is static
    torch.testing.assert_close(program.module()(*inputs), model(*inputs))


def test_masks_are_finite_and_fp16_safe():
    mask = attention_mask(4, 6, filled=2, dtype=torch.float16)
    assert mask.shape == (1, 4, 6 + 4) and torch.isfinite(mask).all()
    cache, own = mask[0, :, :6], mask[0, :, 6:]
    assert (cache[:, :2] == 0).all() and (cache[:, 2:] == MASK_MIN).all()
    assert (own == 0).equal(torch.ones(4, 4, dtype=torch.bool).tril()) and (own[own != 0] == MASK_MIN).all()


def test_positions_past_the_rope_table_are_clamped_not_out_of_bounds():
    params = tiny_params()
    model = rewritten(params, tiny_weights(params))
    cache = SlidingCache(params, MAX_SEQ, SEQ)
    cache.pos = MAX_SEQ - 2  # two real tokens fit; the six padded positions run past the table
    padded, _, _ = model(*cache.inputs([1, 2]))
    exact, _, _ = model(*cache.inputs([1, 2], seq_length=2))
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotate_is_the_reference_rope_to_the_bit(dtype):
    params = tiny_params()
    x = (torch.randn(1, 5, 3, canonical.head_dim(params)) * 100).to(dtype)
    cos, sin = (table[7:12] for table in rope_table(params, 32, dtype))
    assert torch.equal(rotate(x, *rotary_rows(cos, sin)), apply_rope(x, cos, sin))


def test_rope_table_is_the_one_upstreams_runner_computes():
    from executorch.examples.models.llama.model_args import ModelArgs
    from executorch.examples.models.llama.static_attention import StaticAttentionIOManager

    for variant in ("gqa", "llama3_rope"):
        params = tiny_params(**VARIANTS[variant])
        manager = StaticAttentionIOManager(ModelArgs(max_context_len=MAX_SEQ, **params), input_len=1,
                                           cache_lens=MAX_SEQ - 1, dtype=torch.float16)
        cos, sin = rope_table(params, MAX_SEQ, torch.float16)
        assert torch.equal(cos, manager.freqs_cos) and torch.equal(sin, manager.freqs_sin)
