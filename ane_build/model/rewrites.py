"""Rewrites that make ``AneLlama`` run well on the Neural Engine: the recipe's ``ane:`` section.

Keys read by ``apply`` (others are left to the recipe schema):

- ``dtype``: ``fp16`` (default) or ``fp32``. bf16 is refused: Core ML computes on the
  ANE in fp16 and the ANE has no bf16.
- ``target_split_size`` (default: no splitting) and ``max_splits`` (default 8): cut every
  Linear, the LM head included, into chunks along out_features (``split_count``): the
  seed's way of keeping each matmul narrow enough for the ANE (a 49152-wide LM head
  especially). The seed never splits in_features in practice (in_max_splits=1), nor do we.

- ``share_embedding`` (default false): for a checkpoint with tied embeddings, drop the embedding
  table and read token rows from the LM head (``ane_llama.head_rows``): the program then holds the
  vocabulary's 49152 x 576 (SmolLM2) once, quantized as the head is, not twice.

Every RMSNorm is also replaced by ``SafeRMSNorm``, which does not overflow in fp16. Not a
setting: in fp16 the plain norm breaks real models (in eager fp16, SmolLM2-135M's top-1
agreed with the fp32 reference at 3 of 64 positions with it, at 64 of 64 with
``SafeRMSNorm``), and in fp32 the two are the same function.
"""

import math

import torch
from torch import nn

from ane_build.model.ane_llama import RMSNorm
from ane_build.util.errors import UserError

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
DEFAULT_MAX_SPLITS = 8


class SafeRMSNorm(nn.Module):
    """RMSNorm that stays finite in fp16; the same function as ``RMSNorm``, not an approximation.

    Real Llama activations reach the thousands (up to 22552 into a norm of SmolLM2-135M on
    plain English text), and x * x overflows fp16 (max 65504) as soon as |x| > 256.
    Dividing by m = max|x| first keeps every square <= 1 and their mean >= 1/dim, and for
    any m > 0

        x / sqrt(mean(x^2) + eps) = (x/m) / sqrt(mean((x/m)^2) + (sqrt(eps)/m)^2).

    The last term is squared after dividing because eps / m^2 would overflow in m^2 first.
    m = max|x| + sqrt(eps), so an all-zero row (a padded position) gives 0, not 0/0; an
    offset rather than a clamp because Core ML's converter rejects clamp_min(fp16, float).
    Plain ops only (abs, amax, add, div, mean, rsqrt): all convert to Core ML and run in fp16.
    """

    def __init__(self, weight, eps):
        super().__init__()
        self.weight = weight
        self.eps = eps

    @classmethod
    def replacing(cls, norm):
        return cls(norm.weight, norm.eps)

    def forward(self, x):
        root_eps = math.sqrt(self.eps)
        m = x.abs().amax(-1, keepdim=True) + root_eps
        scaled, r = x / m, root_eps / m
        return scaled * torch.rsqrt(scaled.pow(2).mean(-1, keepdim=True) + r * r) * self.weight


class SplitLinear(nn.Module):
    """A bias-free Linear computed as equal chunks of out_features, concatenated, or with
    ``stack`` stacked on a new axis ([..., n_chunks, out_features / n_chunks]: the same values in
    order). The LM head's chunks are stacked: concatenated they are one axis as wide as the
    vocabulary, past the 16384 that Neural Engines before the M4 generation take.

    ``chunks`` are ordinary ``nn.Linear`` (named ``<layer>.chunks.<i>.weight``) so weight
    quantizers find them like any other Linear. Chunk weights are copies, not views of one
    tensor: safetensors refuses to save tensors that share storage.
    """

    def __init__(self, linear, n_chunks, stack=False):
        super().__init__()
        self.stack = stack
        size = linear.out_features // n_chunks
        self.chunks = nn.ModuleList()
        for rows in linear.weight.detach().split(size):
            chunk = nn.Linear(linear.in_features, size, bias=False, device="meta")
            chunk.weight = nn.Parameter(rows.clone(), requires_grad=linear.weight.requires_grad)
            self.chunks.append(chunk)

    def forward(self, x):
        outputs = [chunk(x) for chunk in self.chunks]
        return torch.stack(outputs, dim=-2) if self.stack else torch.cat(outputs, dim=-1)


LM_HEAD = "output"


def split_count(out_features, target_split_size, max_splits):
    """Number of chunks a layer is cut into: exactly the seed's rule (its SplitLinearModule).

    n = max(out_features // target_split_size, 1), capped at max_splits; chunks are
    out_features / n wide. So a layer narrower than twice target_split_size stays whole,
    out_features need not be a multiple of target_split_size (1536 at target 1024 stays
    one chunk, at 512 it is three), and a wide layer gets max_splits chunks (the 49152-wide
    LM head at 1024 / 8: eight of 6144). When n does not divide out_features the seed
    fails, with no fallback to another n; ``apply`` raises a UserError there.
    """
    return min(max(out_features // target_split_size, 1), max_splits)


def apply(model, ane_params, where="recipe"):
    """Rewrite ``model`` (an AneLlama) in place as ``ane_params`` asks and return it in its dtype.

    ``where`` prefixes UserError messages (the recipe file). Every split is checked before
    any is made, so a bad split size leaves the model as it was.

    Works on a model whose parameters are still on the meta device too: that is how to
    rebuild the module tree for a saved rewritten state (``AneLlama(params, n)``, ``apply``,
    then ``load_state_dict(state, strict=True, assign=True)``).
    """
    dtype = _dtype(ane_params.get("dtype", "fp16"), where)
    if ane_params.get("share_embedding"):
        _share_embedding(model, where)
    target = ane_params.get("target_split_size")
    if target is not None:
        target = _positive_int(target, "target_split_size", where)
        max_splits = _positive_int(ane_params.get("max_splits", DEFAULT_MAX_SPLITS), "max_splits", where)
        for name, n in _split_plan(model, target, max_splits, where).items():
            _replace(model, name, SplitLinear(model.get_submodule(name), n, stack=name == LM_HEAD))
    for name, norm in list(model.named_modules()):
        if isinstance(norm, RMSNorm):
            _replace(model, name, SafeRMSNorm.replacing(norm))
    return model.to(dtype)


def _share_embedding(model, where):
    """Drop the embedding table: the model reads token rows from its LM head instead."""
    table, head = model.tok_embeddings.weight, model.output.weight
    if not table.is_meta and not torch.equal(table, head):
        raise UserError(where, "ane.share_embedding: this checkpoint's embedding and LM head differ (its "
                               "embeddings are not tied), so the head cannot serve as the embedding table")
    model.tok_embeddings = None


def _split_plan(model, target, max_splits, where):
    """{layer name: chunk count} for every Linear that gets more than one chunk."""
    plan = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        n = split_count(module.out_features, target, max_splits)
        if module.out_features % n:
            raise UserError(where, f"ane.target_split_size={target} (max_splits={max_splits}) cuts "
                                   f"layer {name} (out_features={module.out_features}) into {n} chunks, "
                                   f"which does not divide {module.out_features}; choose sizes where "
                                   "min(out_features // target_split_size, max_splits) divides "
                                   "every layer's out_features")
        if n > 1:
            plan[name] = n
    return plan


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _dtype(name, where):
    if name in ("bf16", "bfloat16"):
        raise UserError(where, f"ane.dtype={name} is not supported: Core ML computes on the Neural "
                               "Engine in fp16 and the ANE has no bf16; use fp16 "
                               "(or fp32 to debug on CPU)")
    if name not in DTYPES:
        raise UserError(where, f"ane.dtype={name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _positive_int(value, key, where):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(where, f"ane.{key}={value!r}: expected a positive integer")
    return value
