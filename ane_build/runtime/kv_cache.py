"""The caller-owned KV caches of one generation, and the inputs of its calls, all updated in place.

The programs' calling convention is upstream ExecuTorch's (``StaticAttentionIOManager``,
``style="smart_mask"``; see ``model.ane_llama``), and this is its runner side. We keep our own
rather than drive the program through upstream's manager because its cache update clones every
layer's caches on every call (``torch.clone`` in ``StaticKVCache.apply_update``, 23.6 MB a token
for the default recipe) and rebuilds the inputs each call; here a step writes only the new rows.
Upstream's manager drives our programs as they are (``runtime.lookahead`` uses it).

The caches are a ring of ``cache_size`` slots: position p lives in slot p % cache_size, so
once the ring is full each new token overwrites the oldest one (a sliding window). A ring
rather than a shift: writing a call's rows costs O(rows), where shifting the window would
move the whole cache every step. Slot order does not matter to attention, as keys are
stored already rotated for their absolute position and every open slot is attended to
alike; so positions keep counting past cache_size (RoPE wants absolute positions) and
only the slot wraps.

Slots fill in order, so the open cache columns of the mask are always a prefix
[0, filled): a call opens only the columns filled since its method's previous call, and
none once the ring is full. The new-token block of the mask is the fixed causal triangle.

Each method's inputs (tokens, mask, rotary rows, last_valid_token_pos) are allocated once and
overwritten in place, and with the caches they make one flat input list built once: an
ExecuTorch method reads them where they are (the export does not plan graph inputs into its
arena), so a step copies nothing in proportion to the cache.
"""

from dataclasses import dataclass

import torch

from ane_build.model import io
from ane_build.model.ane_llama import SLOT_DIM, attention_mask, empty_caches


@dataclass
class Call:
    """The inputs of one method's calls: ``args`` in the model's signature, ``flat`` as ExecuTorch takes them."""

    seq_length: int
    tokens: torch.Tensor  # [1, seq_length] int32
    mask: torch.Tensor  # [1, seq_length, cache_size + seq_length]
    freqs_cos: torch.Tensor  # [seq_length, head_dim / 2]
    freqs_sin: torch.Tensor
    last_valid_token_pos: torch.Tensor  # [1]
    args: tuple
    flat: list
    opened: int = 0  # cache columns of ``mask`` opened so far


class KVCache:
    """Caches, position and per-method inputs for a program's ``info``, ``methods`` and ``rope``
    (its rotary table: cos and sin [max_seq_length, head_dim / 2])."""

    def __init__(self, info, methods, rope):
        self.cache_size = info.cache_size
        # empty_caches reads only these params (n_kv_heads defaults to n_heads).
        shape_params = {"n_layers": info.n_layers, "n_heads": info.n_kv_heads, "head_dim": info.head_dim}
        self.k_caches, self.v_caches = empty_caches(shape_params, info.cache_size, info.use_cache_list,
                                                    info.torch_dtype)
        self.rope = rope
        self.pos = 0  # tokens written so far: the absolute position of the next one
        self.calls = {name: self._new_call(name, n, info.torch_dtype) for name, n in methods.items()}

    def _new_call(self, method, seq_length, dtype):
        tokens = torch.zeros((1, seq_length), dtype=torch.int32)
        mask = attention_mask(seq_length, self.cache_size, 0, dtype)
        freqs_cos, freqs_sin = (table[:seq_length].clone() for table in self.rope)
        last = torch.zeros(1, dtype=torch.long)
        args = (tokens, mask, freqs_cos, freqs_sin, self.k_caches, self.v_caches)
        args = args if method == io.VERIFY else (*args, last)  # verify returns every position's logits
        return Call(seq_length, tokens, mask, freqs_cos, freqs_sin, last, args, io.flat_inputs(args))

    @property
    def filled(self):
        return min(self.pos, self.cache_size)

    def prepare(self, method, tokens):
        """``method``'s inputs for ``tokens`` (at most its seq_length) at the current position."""
        call, n = self.calls[method], len(tokens)
        call.tokens[0, :n] = torch.as_tensor(tokens)
        # Real tokens never see the padding after them (causal), but zeros keep calls reproducible.
        call.tokens[0, n:] = 0
        # Padding past the table's end reads its last row: finite, and its outputs are dropped.
        rows = torch.arange(self.pos, self.pos + call.seq_length).clamp(max=len(self.rope[0]) - 1)
        torch.index_select(self.rope[0], 0, rows, out=call.freqs_cos)
        torch.index_select(self.rope[1], 0, rows, out=call.freqs_sin)
        call.last_valid_token_pos[0] = n - 1
        if call.opened < self.filled:
            call.mask[..., call.opened:self.filled] = 0
            call.opened = self.filled
        return call

    def commit(self, new_k, new_v, n):
        """Write a call's first ``n`` new slots into the ring (only the last cache_size of them can stay)."""
        keep = min(n, self.cache_size)
        row = n - keep
        slot = (self.pos + row) % self.cache_size
        head = min(keep, self.cache_size - slot)
        for caches, news in ((self.k_caches, new_k), (self.v_caches, new_v)):
            pairs = zip(caches, news) if isinstance(caches, list) else [(caches, news)]
            for cache, rows in pairs:
                cache.narrow(SLOT_DIM, slot, head).copy_(rows.narrow(SLOT_DIM, row, head))
                if head < keep:  # past the ring's end: the rest starts over at slot 0
                    cache.narrow(SLOT_DIM, 0, keep - head).copy_(rows.narrow(SLOT_DIM, row + head, keep - head))
        self.pos += n


def feed(program, cache, tokens):
    """Run ``tokens`` through ``program`` from the cache's position; the last one's logits [vocab].

    Long inputs go in chunks of the longest call (chunked prefill). Each chunk goes to the
    method with the fewest tokens per call that holds it, so a lone token takes a one-token
    "forward" when the program has a one-token one rather than a padded prefill.
    """
    lengths = {name: n for name, n in program.methods.items() if name != io.VERIFY}
    longest = max(lengths.values())
    for start in range(0, len(tokens), longest):
        chunk = tokens[start:start + longest]
        _, method = min((n, name) for name, n in lengths.items() if n >= len(chunk))
        logits, new_k, new_v = program.run(method, cache.prepare(method, chunk))
        cache.commit(new_k, new_v, len(chunk))
    return logits[0]


def feed_every(program, cache, tokens):
    """Run ``tokens`` through ``program``'s verify method from the cache's position, in chunks of its
    seq_length; every token's logits [len(tokens), vocab] (teacher-forced scoring in a few calls)."""
    per_call, rows = program.methods[io.VERIFY], []
    for start in range(0, len(tokens), per_call):
        chunk = tokens[start:start + per_call]
        logits, new_k, new_v = program.run(io.VERIFY, cache.prepare(io.VERIFY, chunk))
        cache.commit(new_k, new_v, len(chunk))
        rows.append(logits[:len(chunk)])
    return torch.cat(rows)


def teacher_forced(program, cache, prompt_ids, continuation, verify=False):
    """Logits [len(continuation), vocab]: after the prompt, then after each token of the continuation
    but the last, as if generated. One call per token after the prompt, as a generation makes them,
    or with ``verify`` (where the program has that method) seq_length positions per call."""
    if verify and io.VERIFY in program.methods:
        return feed_every(program, cache, [*prompt_ids, *continuation[:-1]])[len(prompt_ids) - 1:]
    first = feed(program, cache, prompt_ids)
    return torch.stack([first] + [feed(program, cache, [token]) for token in continuation[:-1]])
