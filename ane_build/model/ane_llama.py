"""The Llama we export for the Apple Neural Engine: static shapes, caller-owned KV caches.

Parameter names are the canonical checkpoint's (``tok_embeddings.weight``,
``layers.N.attention.wq.weight`` ... ``output.weight``), so the model loads with
``load_state_dict(weights, strict=True, assign=True)`` and quantization/export code can
pick layers by name.

Calling convention: upstream ExecuTorch's for static-shape LLMs (``StaticAttentionIOManager``
with ``style="smart_mask"``, ``run_static_llm_multifunction.py``), so that its runners drive
our programs. One call processes ``seq_length`` tokens (S), read from the input shape, never
stored, so the same weights trace a 64-token prefill and a 1-token decode:

- ``tokens`` [1, S] int32: the real tokens, then the caller's padding;
- ``attn_mask`` [1, S, cache_size + S]: additive, over the cache slots and then the call's own
  tokens; the caller owns all of it, the causal block included (``attention_mask``);
- ``freqs_cos`` / ``freqs_sin`` [S, head_dim / 2]: the rotary table's rows at the tokens'
  positions; the caller slices them from the table (``io.rope_table``);
- ``k_caches`` / ``v_caches``: either a list with one tensor per layer (the recipe's
  ``use_cache_list``, upstream's form) or one tensor stacking them on a leading n_layers axis;
  a layer's keys and values are both [1, n_kv_heads, cache_size, head_dim]. Keys are stored
  rotated, so the slot order inside a cache does not matter;
- ``last_valid_token_pos`` [1] int64: the position in the call whose logits are returned.

It returns ``(logits, new_k, new_v)``: logits [1, vocab] (upstream's form: the split LM head's
chunks joined); without ``last_valid_token_pos`` (a verify method: upstream's full-logits
form) every position's, as the LM head gives them ([1, S, n_chunks, vocab / n_chunks] when it
is split, so no axis is the vocabulary's width). new_k/new_v hold only the S new
rows per layer, [1, n_kv_heads, S, head_dim] (stacked on a leading n_layers axis without
``use_cache_list``); the caller writes the real ones into its ring buffer
(``runtime.kv_cache``; ``SlidingCache`` is a minimal pure-torch caller for tests).
"""

import torch
from torch import nn
from torch.nn import functional as F

from ane_build.checkpoint import canonical
from ane_build.model.reference import rms_norm

# Not -inf: softmax subtracts the row max, and -inf - (-inf) is NaN wherever a row is fully
# masked (or when a backend adds -inf to an fp16 score). A large finite value is as good:
# exp() of anything below -20 is already 0 in fp16. Half of fp16's minimum, not the minimum
# itself, so that score + mask cannot overflow to -inf in fp16.
MASK_MIN = torch.finfo(torch.float16).min / 2
# The axis of a layer's key or value cache that holds its slots.
SLOT_DIM = -2


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
        keys = torch.cat([k_cache, k], dim=SLOT_DIM)
        values = torch.cat([v_cache, v], dim=SLOT_DIM)
        return self.wo(self._grouped_attention(q, keys, values, mask)), k, v

    def _grouped_attention(self, q, keys, values, mask):
        """Grouped-query attention, each kv head serving n_heads / n_kv_heads query heads, as two
        matmuls and a softmax of rank 3: q [1, S, n_heads, head_dim], keys and values [1, n_kv_heads,
        slots, head_dim], mask [rep * S, slots]
        (``grouped_mask``) -> [1, S, n_heads * head_dim].

        The query heads of one kv head attend as extra query rows of it ([n_kv_heads, rep * S,
        head_dim]), so the caches are read as they are, never copied out to every query head,
        and no tensor has rank 5 (which Core ML has been reported to run wrongly). Written out
        rather than as scaled_dot_product_attention, whose CPU decomposition casts fp16 caches to
        fp32 and transposes the keys on every call, and whose fused Core ML op the Neural Engine
        is not reported to take. The keys enter the first matmul transposed, as upstream's
        convention keeps them: Core ML folds that transpose into the matmul (``transpose_y``).
        """
        _, seq, n_heads, hd = q.shape
        # The scale on the queries (a few rows), not the scores: for head_dim 64 it is exact.
        rows = (q.transpose(1, 2) * hd ** -0.5).reshape(self.n_kv_heads, -1, hd)
        scores = torch.bmm(rows, keys.squeeze(0).transpose(1, 2)) + mask
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

    x [1, T, H, D]; cos / sin [T, 1, D] from ``rotary_rows``: each pair's cosine
    twice, its sine as (-sin, sin). A pair (a, b) becomes (a cos + b (-sin), b cos + a sin):
    the reference's (a cos - b sin, a sin + b cos) to the bit, as negation is exact and a
    sum of two does not depend on its order. The pairs are split out of x without its batch
    axis: with it they would be rank 5, which the Neural Engine does not take.
    """
    rows = x.squeeze(0)
    pairs = rows.unflatten(-1, (-1, 2))
    swapped = torch.stack((pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (rows * cos + swapped * sin).unsqueeze(0)


def rotary_rows(freqs_cos, freqs_sin):
    """A call's rotary inputs ([S, head_dim / 2] each) shaped for ``rotate``, once per call."""
    return tuple(torch.stack(pair, dim=-1).flatten(-2)[:, None, :]
                 for pair in ((freqs_cos, freqs_cos), (-freqs_sin, freqs_sin)))


class AneLlama(nn.Module):
    """See the module docstring for the forward contract.

    Parameters are created on the meta device: load them with
    ``load_state_dict(weights, strict=True, assign=True)`` (``from_weights`` does), which
    spares initialising a hundred million numbers only to overwrite them.
    """

    def __init__(self, params):
        super().__init__()
        with torch.device("meta"):
            self.tok_embeddings = nn.Embedding(params["vocab_size"], params["dim"])
            self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params["n_layers"]))
            self.norm = RMSNorm(params["dim"], params["norm_eps"])
            self.output = nn.Linear(params["dim"], params["vocab_size"], bias=False)

    @classmethod
    def from_weights(cls, params, weights):
        """An fp32 model over canonical ``weights`` (Meta names); fp32 tensors are shared, not copied."""
        model = cls(params)
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    def forward(self, tokens, attn_mask, freqs_cos, freqs_sin, k_caches, v_caches, last_valid_token_pos=None):
        seq_length = tokens.shape[1]
        cos, sin = rotary_rows(freqs_cos, freqs_sin)
        mask = self.layers[0].attention.grouped_mask(attn_mask.squeeze(0))
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else head_rows(self.output, tokens)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, cos, sin, k_caches[i], v_caches[i], mask)
            new_k.append(k)
            new_v.append(v)
        if last_valid_token_pos is None:  # every position's logits, as the LM head gives them
            logits = self.output(self.norm(h))
        else:
            # Only the last real token's logits are needed: norm and LM head on one row, not
            # seq_length. The row is picked by a matmul with a one-hot row rather than gathered
            # mid-graph, which would send the graph to the CPU and back between the last layer and
            # the LM head: the lookup of the one-hot row depends on the inputs alone, so it runs
            # with the embedding's.
            one_hot = torch.eye(seq_length, dtype=h.dtype).index_select(0, last_valid_token_pos)
            logits = flat_logits(self.output(self.norm(one_hot @ h.squeeze(0))))
        if isinstance(k_caches, torch.Tensor):
            return logits, torch.stack(new_k), torch.stack(new_v)
        return logits, new_k, new_v


def head_rows(head, tokens):
    """The embedding of a tied checkpoint read from its LM head ``head`` (a Linear, or split in chunks of
    rows): each chunk gives the rows of the ids it holds, zeros for the rest (exact: one term of each
    sum is nonzero). A gather per chunk rather than one on the chunks joined: Core ML would join the
    whole table at run time for that."""
    chunks = getattr(head, "chunks", [head])
    width, dtype = chunks[0].out_features, chunks[0].weight.dtype
    # Which chunk holds each id, looked up like the rows: a table of constants (Core ML folds it when
    # converting), where comparing the ids would be integer arithmetic outside any lookup (lint).
    holders = torch.arange(width * len(chunks))[:, None] // width == torch.arange(len(chunks))
    held = nn.functional.embedding(tokens, holders.to(dtype))
    rows = 0
    for i, chunk in enumerate(chunks):
        index = (tokens - i * width).clamp(0, width - 1)
        rows = rows + nn.functional.embedding(index, chunk.weight) * held[..., i:i + 1]
    return rows


def flat_logits(logits):
    """One row of logits as [1, vocab], whether the LM head was split or not (a view)."""
    return logits.reshape(1, -1)


def logit_rows(logits):
    """A call's logits as [rows, vocab]: [1, vocab] stays, a verify call's [1, S, ...] becomes [S, vocab]."""
    return logits if logits.dim() == 2 else logits.reshape(logits.shape[1], -1)


def attention_mask(seq_length, cache_size, filled=0, dtype=torch.float32):
    """The additive mask input of a call [1, S, cache_size + S]: the first ``filled`` cache slots
    open, the rest closed; the call's own tokens see themselves and those before them."""
    mask = torch.full((1, seq_length, cache_size + seq_length), MASK_MIN)
    mask[..., :filled] = 0
    mask[..., cache_size:] = mask[..., cache_size:].triu(1)
    return mask.to(dtype)


def rope_table(params, length, dtype=torch.float32):
    """cos and sin [length, head_dim / 2]: the rotary table a caller slices a call's rows from.

    Computed by ExecuTorch's own ``Rope`` from the params, as upstream's runners compute it from
    params.json, so that every runner feeds a program the same bits (a table of our own, in
    other arithmetic, differs from theirs in the last fp16 bit here and there).
    """
    from executorch.examples.models.llama.model_args import ModelArgs
    from executorch.examples.models.llama.rope import Rope

    cos, sin = Rope(ModelArgs(max_context_len=length, **params)).get_freqs(None, length)
    return cos.to(dtype), sin.to(dtype)


def empty_caches(params, cache_size, use_cache_list, dtype=torch.float32):
    """Zeroed (k_caches, v_caches) in the layout ``use_cache_list`` selects."""
    n_kv_heads, hd = params.get("n_kv_heads") or params["n_heads"], canonical.head_dim(params)
    shape = (1, n_kv_heads, cache_size, hd)
    if use_cache_list:
        return tuple([torch.zeros(shape, dtype=dtype) for _ in range(params["n_layers"])] for _ in "kv")
    return tuple(torch.zeros((params["n_layers"], *shape), dtype=dtype) for _ in "kv")


class SlidingCache:
    """A minimal caller (for tests; the real runner is ``runtime.kv_cache``): caches and position
    between calls.

    The cache is a ring buffer: once full, each new token overwrites the oldest slot, so a
    call attends to the last cache_size tokens before it plus its own, causally. Slots fill
    in order, so the open mask columns are always a prefix of the cache. The caches are
    shared by calls of any seq_length (a 64-token prefill, then 1-token decodes);
    cache_size defaults to max_seq_length - 1, as upstream's multifunction export sizes it.
    """

    def __init__(self, params, max_seq_length, seq_length, cache_size=None,
                 use_cache_list=True, dtype=torch.float32):
        self.max_seq_length, self.seq_length = max_seq_length, seq_length
        self.cache_size = max_seq_length - 1 if cache_size is None else cache_size
        self.use_cache_list, self.dtype = use_cache_list, dtype
        self.k_caches, self.v_caches = empty_caches(params, self.cache_size, use_cache_list, dtype)
        self.freqs_cos, self.freqs_sin = rope_table(params, max_seq_length, dtype)
        self.pos = 0  # tokens written so far: the absolute position of the next one

    def inputs(self, tokens, seq_length=None):
        """Forward inputs for the token ids, padded with 0 to seq_length (default: the prefill's)."""
        seq_length = seq_length or self.seq_length
        n = len(tokens)
        if not 0 < n <= seq_length or self.pos + n > self.max_seq_length:
            raise ValueError(f"{n} tokens at position {self.pos} do not fit "
                             f"seq_length={seq_length}, max_seq_length={self.max_seq_length}")
        padded = torch.tensor([list(tokens) + [0] * (seq_length - n)], dtype=torch.int32)
        mask = attention_mask(seq_length, self.cache_size, min(self.pos, self.cache_size), self.dtype)
        rows = torch.arange(self.pos, self.pos + seq_length).clamp(max=self.max_seq_length - 1)
        return (padded, mask, self.freqs_cos[rows], self.freqs_sin[rows], self.k_caches, self.v_caches,
                torch.tensor([n - 1]))

    def update(self, new_k, new_v, input_length):
        """Write the first input_length new slots into the ring (only the last cache_size survive)."""
        keep = min(input_length, self.cache_size)
        rows = torch.arange(input_length - keep, input_length)
        slots = (self.pos + rows) % self.cache_size
        for caches, news in ((self.k_caches, new_k), (self.v_caches, new_v)):
            for cache, new in zip(caches, news) if self.use_cache_list else [(caches, news)]:
                cache.index_copy_(SLOT_DIM, slots, new.index_select(SLOT_DIM, rows))
        self.pos += input_length

    def step(self, model, tokens, seq_length=None):
        """One forward call on the token ids, recorded in the cache; returns the logits [1, vocab]."""
        logits, new_k, new_v = model(*self.inputs(tokens, seq_length))
        self.update(new_k, new_v, len(tokens))
        return logits
