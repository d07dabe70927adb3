import pytest
import torch

from ane_build.model.ane_llama import MASK_MIN, SLOT_DIM
from ane_build.runtime.kv_cache import KVCache, feed
from ane_build.runtime.program import open_eager
from tests import float_bounds
from tests.model.test_ane_llama import masked_reference, tokens_for, windowed
from tests.runtime.tiny_programs import CACHE, MAX, SEQ, calls, run_calls
from tests.tiny_llama import tiny_params, tiny_weights

LAYOUTS = {"list": True, "tensor": False}


def eager(checkpoint, layout="list", cache_size=CACHE):
    return open_eager(checkpoint, seq_length=SEQ, max_seq_length=MAX, cache_size=cache_size,
                      use_cache_list=LAYOUTS[layout])


def caches(cache):
    """Every cache tensor, whatever the layout, with the axis of its slots."""
    return [(t, SLOT_DIM) for c in (cache.k_caches, cache.v_caches) for t in (c if isinstance(c, list) else [c])]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cache_size", [CACHE, 5])  # 5: a prefill chunk is longer than the whole window
def test_generation_past_the_window_matches_the_windowed_reference(checkpoint, layout, cache_size):
    params = tiny_params()
    tokens = tokens_for(params, MAX)
    outputs = run_calls(eager(checkpoint, layout, cache_size), tokens, 20)
    run = calls(20, MAX - 20)
    expected = masked_reference(params, tiny_weights(params), tokens, windowed(run, cache_size)).float()
    assert len(outputs) == len(run) and run[-1][0] > 3 * cache_size
    for (start, n, _), logits in zip(run, outputs):
        torch.testing.assert_close(logits, expected[start + n - 1], atol=float_bounds.TINY_FP32_ATOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_step_writes_only_its_rows_in_place(checkpoint, layout):
    program = eager(checkpoint, layout)
    cache = KVCache(program.info, program.methods, program.rope)
    tensors = caches(cache)
    pointers = [t.data_ptr() for t, _ in tensors]
    inputs = {name: [t.data_ptr() for t in call.flat] for name, call in cache.calls.items()}
    for token in tokens_for(tiny_params(), 2 * CACHE + 3):
        before = [t.clone() for t, _ in tensors]
        slot = cache.pos % CACHE
        feed(program, cache, [token])
        for old, (new, dim) in zip(before, tensors):
            changed = (old != new).movedim(dim, 0).flatten(1).any(1)  # per slot
            assert changed.nonzero().flatten().tolist() == [slot]
    assert cache.pos == 2 * CACHE + 3
    assert [t.data_ptr() for t, _ in caches(cache)] == pointers  # the same tensors throughout
    assert {name: [t.data_ptr() for t in call.flat] for name, call in cache.calls.items()} == inputs


def test_masks_open_cache_columns_as_slots_fill(checkpoint):
    program = eager(checkpoint)
    cache = KVCache(program.info, program.methods, program.rope)
    tokens = tokens_for(tiny_params(), 20)
    feed(program, cache, tokens[:5])
    decode = cache.prepare("forward", [tokens[5]])
    assert (decode.mask[..., :5] == 0).all() and (decode.mask[..., 5:CACHE] == MASK_MIN).all()
    assert (decode.mask[..., CACHE:] == 0).all()  # the token sees itself
    feed(program, cache, tokens[5:])
    prefill = cache.prepare("prefill", [1, 2])
    assert prefill.mask.shape == (1, SEQ, CACHE + SEQ) and (prefill.mask[..., :CACHE] == 0).all()  # a full ring
    assert (prefill.mask[0, :, CACHE:] == 0).equal(torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
    assert prefill.tokens.tolist() == [[1, 2] + [0] * (SEQ - 2)] and prefill.tokens.dtype == torch.int32
    assert prefill.last_valid_token_pos.item() == 1
    # The rotary rows of positions 20..27, as the table has them.
    assert torch.equal(prefill.freqs_cos, program.rope[0][20:20 + SEQ])
    assert torch.equal(prefill.freqs_sin, program.rope[1][20:20 + SEQ])


def test_the_window_matters(checkpoint):
    """Past the window the runner's logits are not full causal attention's (so the tests above can fail)."""
    params = tiny_params()
    tokens = tokens_for(params, 30)
    outputs = run_calls(eager(checkpoint), tokens, 20)
    full = masked_reference(params, tiny_weights(params), tokens, torch.ones(30, 30, dtype=torch.bool).tril())
    assert (full[-1].float() - outputs[-1]).abs().max() > 1e-3
