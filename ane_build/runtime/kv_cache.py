"""The caller-owned KV caches of one generation, and the inputs of its calls, all updated in place.

The caches are a ring of ``cache_size`` slots: position p lives in slot p % cache_size, so
once the ring is full each new token overwrites the oldest one (a sliding window). A ring
rather than a shift: writing a call's rows costs O(rows), where shifting the window would
move the whole cache every step. Slot order does not matter to attention, as keys are
stored already rotated for their absolute position and every open slot is attended to
alike; so ``input_pos`` keeps counting past cache_size (RoPE wants absolute positions) and
only the slot wraps.

Slots fill in order, so the open cache columns of the mask are always a prefix
[0, filled): a call opens only the columns filled since its method's previous call, and
none once the ring is full. The new-token block of the mask is the fixed causal triangle.

Each method's inputs (tokens, input_pos, input_length, mask) are allocated once and
overwritten in place, and with the caches they make one flat input list built once: an
ExecuTorch method reads them where they are (the export does not plan graph inputs into its
arena), so a step copies nothing in proportion to the cache.
"""

from dataclasses import dataclass

import torch

from ane_build.model import io
from ane_build.model.ane_llama import (
    KEY_SLOT_DIM,
    VALUE_SLOT_DIM,
    as_cached_keys,
    attention_mask,
    empty_caches,
)


@dataclass
class Call:
    """The inputs of one method's calls: ``args`` in the model's signature, ``flat`` as ExecuTorch takes them."""

    seq_length: int
    tokens: torch.Tensor  # [1, seq_length]
    input_pos: torch.Tensor  # [1]
    input_length: torch.Tensor  # [1]
    mask: torch.Tensor  # [seq_length, cache_size + seq_length]
    args: tuple
    flat: list
    opened: int = 0  # cache columns of ``mask`` opened so far


class KVCache:
    """Caches, position and per-method inputs for a program's ``info`` and ``methods``."""

    def __init__(self, info, methods):
        self.cache_size = info.cache_size
        # empty_caches reads only these params (n_kv_heads defaults to n_heads).
        shape_params = {"n_layers": info.n_layers, "n_heads": info.n_kv_heads, "head_dim": info.head_dim}
        self.k_caches, self.v_caches = empty_caches(shape_params, info.cache_size, info.use_cache_list,
                                                    info.torch_dtype)
        self.pos = 0  # tokens written so far: the absolute position of the next one
        self.calls = {name: self._new_call(n, info.torch_dtype) for name, n in methods.items()}

    def _new_call(self, seq_length, dtype):
        tokens = torch.zeros((1, seq_length), dtype=torch.long)
        input_pos, input_length = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        mask = attention_mask(seq_length, self.cache_size, 0, dtype)
        args = (tokens, input_pos, input_length, self.k_caches, self.v_caches, mask)
        return Call(seq_length, tokens, input_pos, input_length, mask, args, io.flat_inputs(args))

    @property
    def filled(self):
        return min(self.pos, self.cache_size)

    def prepare(self, method, tokens):
        """``method``'s inputs for ``tokens`` (at most its seq_length) at the current position."""
        call, n = self.calls[method], len(tokens)
        call.tokens[0, :n] = torch.as_tensor(tokens)
        # Real tokens never see the padding after them (causal), but zeros keep calls reproducible.
        call.tokens[0, n:] = 0
        call.input_pos[0] = self.pos
        call.input_length[0] = n
        if call.opened < self.filled:
            call.mask[:, call.opened:self.filled] = 0
            call.opened = self.filled
        return call

    def commit(self, new_k, new_v, n):
        """Write a call's first ``n`` new slots into the ring (only the last cache_size of them can stay)."""
        keep = min(n, self.cache_size)
        row = n - keep
        slot = (self.pos + row) % self.cache_size
        head = min(keep, self.cache_size - slot)
        for caches, news, dim in ((self.k_caches, as_cached_keys(new_k), KEY_SLOT_DIM),
                                  (self.v_caches, new_v, VALUE_SLOT_DIM)):
            pairs = zip(caches, news) if isinstance(caches, list) else [(caches, news)]
            for cache, rows in pairs:
                cache.narrow(dim, slot, head).copy_(rows.narrow(dim, row, head))
                if head < keep:  # past the ring's end: the rest starts over at slot 0
                    cache.narrow(dim, 0, keep - head).copy_(rows.narrow(dim, row + head, keep - head))
        self.pos += n


def feed(program, cache, tokens):
    """Run ``tokens`` through ``program`` from the cache's position; the last one's logits [vocab].

    Long inputs go in chunks of the longest call (chunked prefill). Each chunk goes to the
    method with the fewest tokens per call that holds it, so a lone token takes a one-token
    "decode" when the program has one rather than a padded forward.
    """
    longest = max(program.methods.values())
    for start in range(0, len(tokens), longest):
        chunk = tokens[start:start + longest]
        _, method = min((n, name) for name, n in program.methods.items() if n >= len(chunk))
        logits, new_k, new_v = program.run(method, cache.prepare(method, chunk))
        cache.commit(new_k, new_v, len(chunk))
    return logits[0]
