"""A plain fp32 Llama over a canonical checkpoint: the yardstick every rewrite is measured against.

Deliberately simple (whole sequence, no KV cache, no rewrites) so that it is easy to
trust; tests check it against Hugging Face ``transformers``.
"""

import math

import torch
from torch import nn

from ane_build.checkpoint import canonical
from ane_build.checkpoint.rope import rope_frequencies


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... (Meta layout). x: [B, T, H, D]."""
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class ReferenceLlama(nn.Module):
    def __init__(self, params, weights):
        super().__init__()
        self.params = params
        self.w = {k: v.float() for k, v in weights.items()}
        self.inv_freq = rope_frequencies(params)

    @classmethod
    def from_checkpoint(cls, ckpt_dir):
        return cls(canonical.read_params(ckpt_dir), canonical.read_weights(ckpt_dir))

    @torch.no_grad()
    def forward(self, tokens):
        """tokens: [B, T] int -> logits [B, T, vocab] fp32 (positions 0..T-1)."""
        return self.logits(tokens)

    def logits(self, tokens):
        """``forward`` with autograd as the caller has it: calibration differentiates the loss."""
        p, w = self.params, self.w
        n_heads, n_kv, hd = p["n_heads"], p.get("n_kv_heads") or p["n_heads"], canonical.head_dim(p)
        angles = torch.outer(torch.arange(tokens.shape[1], dtype=torch.float64), self.inv_freq)
        cos, sin = angles.cos().float(), angles.sin().float()
        causal = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)
        h = w["tok_embeddings.weight"][tokens]
        for i in range(p["n_layers"]):
            lw = lambda name: w[f"layers.{i}.{name}.weight"]  # noqa: E731
            mm = lambda x, name: self.linear(x, f"layers.{i}.{name}")  # noqa: E731
            x = rms_norm(h, lw("attention_norm"), p["norm_eps"])
            q = apply_rope(mm(x, "attention.wq").unflatten(-1, (n_heads, hd)), cos, sin)
            k = apply_rope(mm(x, "attention.wk").unflatten(-1, (n_kv, hd)), cos, sin)
            v = mm(x, "attention.wv").unflatten(-1, (n_kv, hd))
            k, v = (t.repeat_interleave(n_heads // n_kv, dim=2) for t in (k, v))
            scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd) + causal
            attn = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).flatten(-2)
            h = h + mm(attn, "attention.wo")
            x = rms_norm(h, lw("ffn_norm"), p["norm_eps"])
            gate = torch.nn.functional.silu(mm(x, "feed_forward.w1")) * mm(x, "feed_forward.w3")
            h = h + mm(gate, "feed_forward.w2")
        return self.linear(rms_norm(h, w["norm.weight"], p["norm_eps"]), "output")

    def linear(self, x, name):
        """``x`` times linear ``name``'s weight transposed ("layers.0.attention.wq", "output"): one
        place where a subclass sees every linear's input (calibration sums x^T x there)."""
        return x @ self.w[f"{name}.weight"].T

    def greedy(self, prompt_ids, n_tokens):
        ids = list(prompt_ids)
        for _ in range(n_tokens):
            ids.append(int(self(torch.tensor([ids]))[0, -1].argmax()))
        return ids[len(prompt_ids):]
