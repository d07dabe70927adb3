"""The Llama we export for the Apple Neural Engine: static shapes, caller-owned KV caches.

Parameter names are the canonical checkpoint's (``tok_embeddings.weight``,
``layers.N.attention.wq.weight`` ... ``output.weight``), so the model loads with
``load_state_dict(weights, strict=True, assign=True)`` and quantization/export code can
pick layers by name. The rotary tables are non-persistent buffers, not state.

Calling convention (the seed's; one call processes ``seq_length`` tokens):

- ``tokens`` [1, seq_length] int64: ``input_length`` real tokens, then the caller's padding;
- ``input_pos`` [1] int64: absolute position of ``tokens[0, 0]``;
- ``input_length`` [1] int64: the logits of position ``input_length - 1`` are returned;
- ``k_caches`` / ``v_caches``: either a list with one tensor per layer (the recipe's
  ``use_cache_list``) or one tensor stacking them on a leading n_layers axis. A layer's
  values are [1, n_kv_heads, cache_size, head_dim]; its keys are kept transposed,
  [1, n_kv_heads, head_dim, cache_size] (the slot on the last axis, as upstream's static
  attention can keep them): the scores are then a plain matmul of the queries with the
  cache, and no call transposes a cache-sized tensor. Keys are stored rotated, so the slot
  order inside a cache does not matter;
- ``attn_mask`` [seq_length, cache_size]: additive, over the cache slots (see
  ``attention_mask``); the new tokens see one another causally, which the model adds itself
  (``causal_mask``): an input seq_length wider would break the Neural Engine's 64-byte rows
  in a one-token call (961 columns).

It returns ``(logits, new_k, new_v)``: logits [1, vocab], or [1, n_chunks, vocab / n_chunks]
when the LM head is split (``rewrites.SplitLinear``; ``flat_logits`` makes them [1, vocab]); new_k/new_v hold only the seq_length new
slots per layer, both [1, n_kv_heads, seq_length, head_dim] (stacked on a leading n_layers
axis without ``use_cache_list``): a key cache takes them transposed (``as_cached_keys``); the caller writes the first input_length of them
into its cache (``SlidingCache`` is a minimal pure-torch caller for tests).

seq_length is read from the input shape, never stored, so the same weights trace a
64-token prefill and a 1-token decode.
"""

import torch
from torch import nn
from torch.nn import functional as F

from ane_build.checkpoint import canonical
from ane_build.checkpoint.rope import rope_frequencies
from ane_build.model.reference import rms_norm

# Not -inf: softmax subtracts the row max, and -inf - (-inf) is NaN wherever a row is fully
# masked (or when a backend adds -inf to an fp16 score). A large finite value is as good:
# exp() of anything below -20 is already 0 in fp16. Half of fp16's minimum, not the minimum
# itself, so that score + mask cannot overflow to -inf in fp16.
MASK_MIN = torch.finfo(torch.float16).min / 2
# The axis of a layer's key or value cache that holds its slots.
KEY_SLOT_DIM, VALUE_SLOT_DIM = -1, -2


class RMSNorm(nn.Module):
    """The plain Llama RMSNorm (``rewrites`` swaps in an fp16-safe one)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, params):
        super().__init__()
        dim, hd = params["dim"], canonical.head_dim(params)
        self.n_heads = params["n_heads"]
        self.n_kv_heads = params.get("n_kv_heads") or self.n_heads
        self.head_dim = hd
        self.wq = nn.Linear(dim, self.n_heads * hd, bias=False)
        self.wk = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(self.n_heads * hd, dim, bias=False)

    def forward(self, x, cos, sin, k_cache, v_cache, mask):
        """x [1, S, dim] -> (out [1, S, dim], new keys and values [1, n_kv_heads, S, head_dim])."""
        q = rotate(self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)), cos, sin)
        k = rotate(self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim)), cos, sin).transpose(1, 2)
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim)).transpose(1, 2)
        # The new keys leave in the values' layout (head_dim last: one decoded token's keys in the
        # cache's layout would be a 1-wide last axis, which the Neural Engine pads 32-fold).
        keys = torch.cat([k_cache, k.transpose(-1, -2)], dim=KEY_SLOT_DIM)
        values = torch.cat([v_cache, v], dim=VALUE_SLOT_DIM)
        return self.wo(self._grouped_attention(q, keys, values, mask)), k, v

    def _grouped_attention(self, q, keys, values, mask):
        """Grouped-query attention, each kv head serving n_heads / n_kv_heads query heads, as two
        matmuls and a softmax of rank 3: q [1, S, n_heads, head_dim], keys [1, n_kv_heads,
        head_dim, slots], values [1, n_kv_heads, slots, head_dim], mask [rep * S, slots]
        (``grouped_mask``) -> [1, S, n_heads * head_dim].

        The query heads of one kv head attend as extra query rows of it ([n_kv_heads, rep * S,
        head_dim]), so the caches are read as they are, never copied out to every query head,
        and no tensor has rank 5 (which Core ML has been reported to run wrongly). Written out
        rather than as scaled_dot_product_attention, whose CPU decomposition casts fp16 caches to
        fp32 and transposes the keys on every call, and whose fused Core ML op the Neural Engine
        is not reported to take.
        """
        _, seq, n_heads, hd = q.shape
        # The scale on the queries (a few rows), not the scores: for head_dim 64 it is exact.
        rows = (q.transpose(1, 2) * hd ** -0.5).reshape(self.n_kv_heads, -1, hd)
        scores = torch.bmm(rows, keys.squeeze(0)) + mask
        out = torch.bmm(scores.softmax(-1), values.squeeze(0))  # [n_kv_heads, rep * S, hd]
        return out.reshape(n_heads, seq, hd).transpose(0, 1).reshape(1, seq, n_heads * hd)

    def grouped_mask(self, mask):
        """The mask of a call for ``_grouped_attention``'s query rows; the same in every layer."""
        rep = self.n_heads // self.n_kv_heads
        return mask.repeat(rep, 1) if rep > 1 else mask


class FeedForward(nn.Module):
    def __init__(self, params):
        super().__init__()
        dim, hidden = params["dim"], params["hidden_dim"]
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.attention_norm = RMSNorm(params["dim"], params["norm_eps"])
        self.attention = Attention(params)
        self.ffn_norm = RMSNorm(params["dim"], params["norm_eps"])
        self.feed_forward = FeedForward(params)

    def forward(self, h, cos, sin, k_cache, v_cache, mask):
        attn, k, v = self.attention(self.attention_norm(h), cos, sin, k_cache, v_cache, mask)
        h = h + attn
        return h + self.feed_forward(self.ffn_norm(h)), k, v


def rotate(x, cos, sin):
    """``reference.apply_rope`` in 8 graph nodes instead of 15 (the model runs it 2 x n_layers times).

    x [1, T, H, D]; cos / sin [T, 1, D] from ``AneLlama._rope_rows``: each pair's cosine
    twice, its sine as (-sin, sin). A pair (a, b) becomes (a cos + b (-sin), b cos + a sin):
    the reference's (a cos - b sin, a sin + b cos) to the bit, as negation is exact and a
    sum of two does not depend on its order. The pairs are split out of x without its batch
    axis: with it they would be rank 5, which the Neural Engine does not take.
    """
    rows = x.squeeze(0)
    pairs = rows.unflatten(-1, (-1, 2))
    swapped = torch.stack((pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (rows * cos + swapped * sin).unsqueeze(0)


def rope_tables(params, length):
    """cos and sin [length, head_dim / 2] for positions 0..length-1 (fp64 angles, fp32 values)."""
    angles = torch.outer(torch.arange(length, dtype=torch.float64), rope_frequencies(params))
    return angles.cos().float(), angles.sin().float()


class AneLlama(nn.Module):
    """See the module docstring for the forward contract.

    Parameters are created on the meta device: load them with
    ``load_state_dict(weights, strict=True, assign=True)`` (``from_weights`` does), which
    spares initialising a hundred million numbers only to overwrite them.

    The rotary tables cover positions 0..max_seq_length-1. A caller must not place a real
    token at or past max_seq_length; positions past the table (padding at the end of the
    context) are clamped to its last row, so they read finite values instead of an
    out-of-bounds gather, and their outputs are discarded anyway.
    """

    def __init__(self, params, max_seq_length):
        super().__init__()
        self.max_seq_length = max_seq_length
        cos, sin = rope_tables(params, max_seq_length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(params["vocab_size"], params["dim"])
            self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params["n_layers"]))
            self.norm = RMSNorm(params["dim"], params["norm_eps"])
            self.output = nn.Linear(params["dim"], params["vocab_size"], bias=False)

    @classmethod
    def from_weights(cls, params, weights, max_seq_length):
        """An fp32 model over canonical ``weights`` (Meta names); fp32 tensors are shared, not copied."""
        model = cls(params, max_seq_length)
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def forward(self, tokens, input_pos, input_length, k_caches, v_caches, attn_mask):
        seq_length = tokens.shape[1]
        cos, sin = self._rope_rows(input_pos, seq_length)
        full_mask = torch.cat([attn_mask, causal_mask(seq_length, attn_mask.dtype)], dim=1)
        mask = self.layers[0].attention.grouped_mask(full_mask)
        h = self.tok_embeddings(tokens)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, cos, sin, k_caches[i], v_caches[i], mask)
            new_k.append(k)
            new_v.append(v)
        # Only the last real token's logits are needed: norm and LM head on one row, not seq_length.
        # The row is picked by a matmul with a one-hot row rather than gathered mid-graph, which
        # would send the graph to the CPU and back between the last layer and the LM head: the
        # lookup of the one-hot row depends on the inputs alone, so it runs with the embedding's.
        one_hot = torch.eye(seq_length, dtype=h.dtype).index_select(0, input_length - 1)
        last = one_hot @ h.squeeze(0)
        logits = self.output(self.norm(last))
        if isinstance(k_caches, torch.Tensor):
            return logits, torch.stack(new_k), torch.stack(new_v)
        return logits, new_k, new_v

    def _rope_rows(self, input_pos, seq_length):
        # A tensor index, not input_pos.item() + narrow: .item() makes an unbacked symbolic
        # size that lowers to Core ML but not to the XNNPACK/portable CPU twin.
        positions = input_pos + torch.arange(seq_length, dtype=input_pos.dtype)
        # Both bounds: Core ML's converter turns a max-only clamp into a float clip, and an
        # index must stay integer.
        positions = positions.clamp(0, self.max_seq_length - 1)
        cos, sin = self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)
        # Shaped for ``rotate`` once here rather than in each of its calls.
        cos, sin = (torch.stack(pair, dim=-1).flatten(-2)[:, None, :] for pair in ((cos, cos), (-sin, sin)))
        return cos, sin


def flat_logits(logits):
    """A program's logits as [1, vocab], whether its LM head was split or not (a view)."""
    return logits.reshape(1, -1)


def attention_mask(seq_length, cache_size, filled=0, dtype=torch.float32):
    """The additive mask input of a call: the first ``filled`` cache slots open, the rest closed."""
    mask = torch.full((seq_length, cache_size), MASK_MIN)
    mask[:, :filled] = 0
    return mask.to(dtype)


def causal_mask(seq_length, dtype):
    """How a call's own tokens see one another: each itself and those before it (a constant)."""
    return torch.full((seq_length, seq_length), MASK_MIN).triu(1).to(dtype)


def as_cached_keys(new_k):
    """A call's new keys (a list per layer, or one tensor) as views in the key caches' layout."""
    if isinstance(new_k, torch.Tensor):
        return new_k.transpose(-1, -2)
    return [k.transpose(-1, -2) for k in new_k]


def empty_caches(params, cache_size, use_cache_list, dtype=torch.float32):
    """Zeroed (k_caches, v_caches) in the layout ``use_cache_list`` selects."""
    n_kv_heads, hd = params.get("n_kv_heads") or params["n_heads"], canonical.head_dim(params)
    shapes = (1, n_kv_heads, hd, cache_size), (1, n_kv_heads, cache_size, hd)
    if use_cache_list:
        return tuple([torch.zeros(shape, dtype=dtype) for _ in range(params["n_layers"])] for shape in shapes)
    return tuple(torch.zeros((params["n_layers"], *shape), dtype=dtype) for shape in shapes)


class SlidingCache:
    """A minimal caller (for tests; the real runner is elsewhere): caches and position between calls.

    The cache is a ring buffer: once full, each new token overwrites the oldest slot, so a
    call attends to the last cache_size tokens before it plus its own, causally. Slots fill
    in order, so the open mask columns are always a prefix of the cache. The caches are
    shared by calls of any seq_length (a 64-token prefill, then 1-token decodes);
    cache_size defaults to the seed's max_seq_length - seq_length.
    """

    def __init__(self, params, max_seq_length, seq_length, cache_size=None,
                 use_cache_list=True, dtype=torch.float32):
        self.max_seq_length, self.seq_length = max_seq_length, seq_length
        self.cache_size = max_seq_length - seq_length if cache_size is None else cache_size
        self.use_cache_list, self.dtype = use_cache_list, dtype
        self.k_caches, self.v_caches = empty_caches(params, self.cache_size, use_cache_list, dtype)
        self.pos = 0  # tokens written so far: the absolute position of the next one

    def inputs(self, tokens, seq_length=None):
        """Forward inputs for the token ids, padded with 0 to seq_length (default: the prefill's)."""
        seq_length = seq_length or self.seq_length
        n = len(tokens)
        if not 0 < n <= seq_length or self.pos + n > self.max_seq_length:
            raise ValueError(f"{n} tokens at position {self.pos} do not fit "
                             f"seq_length={seq_length}, max_seq_length={self.max_seq_length}")
        padded = torch.tensor([list(tokens) + [0] * (seq_length - n)], dtype=torch.long)
        mask = attention_mask(seq_length, self.cache_size, min(self.pos, self.cache_size), self.dtype)
        return padded, torch.tensor([self.pos]), torch.tensor([n]), self.k_caches, self.v_caches, mask

    def update(self, new_k, new_v, input_length):
        """Write the first input_length new slots into the ring (only the last cache_size survive)."""
        keep = min(input_length, self.cache_size)
        rows = torch.arange(input_length - keep, input_length)
        slots = (self.pos + rows) % self.cache_size
        pairs = ((self.k_caches, as_cached_keys(new_k), KEY_SLOT_DIM), (self.v_caches, new_v, VALUE_SLOT_DIM))
        for caches, news, dim in pairs:
            for cache, new in zip(caches, news) if self.use_cache_list else [(caches, news)]:
                cache.index_copy_(dim, slots, new.index_select(dim, rows))
        self.pos += input_length

    def step(self, model, tokens, seq_length=None):
        """One forward call on the token ids, recorded in the cache; returns the logits [1, vocab]."""
        logits, new_k, new_v = model(*self.inputs(tokens, seq_length))
        self.update(new_k, new_v, len(tokens))
        return flat_logits(logits)
