"""llama.cpp's GGUF files (llama architecture) -> canonical checkpoint.

Tensors are dequantized to fp32 with the ``gguf`` package. GGUF lists a tensor's dimensions
innermost first (ne0 = columns), so the array gguf hands back, read row-major, already has the
canonical [out, in] shape. llama.cpp's converter undoes Hugging Face's Q/K permutation when it
writes a llama GGUF, so Q/K are in Meta's rotary layout and names map one to one.

The linear weights' quantized blocks (the LM head's too, the embedding's when tied) are also
read as the file has them (``gguf_blocks``), for ``quantize.linear: source``.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants

from ane_build.checkpoint import canonical, gguf_blocks, gguf_tokenizer
from ane_build.checkpoint.blocks import Source
from ane_build.checkpoint.rope import rope_frequencies
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)

ARCH = "llama"
# Types gguf.quants dequantizes that llama.cpp uses for llama checkpoints; others are refused
# rather than trusted untested.
SUPPORTED_TYPES = tuple(GGMLQuantizationType[name] for name in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
# Llama 3.x rope scaling: llama.cpp stores the per-frequency divisors, not the recipe for them.
ROPE_FREQS = "rope_freqs.weight"
CHAT_TEMPLATE = "tokenizer.chat_template"
_TOP_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER_NAMES = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}


def read(path):
    path = Path(path)
    where = str(path)
    reader = _open(path)
    meta = _metadata(reader, where)
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise UserError(where, f"general.architecture is {arch!r}; only {ARCH!r} GGUF files are supported")
    tensors = {t.name: t for t in reader.tensors}
    params = _params(meta, tensors, where)
    # Everything cheap is checked before the (slow, for big models) dequantization.
    tokenizer_name, tokenizer_bytes = gguf_tokenizer.build(meta, where)
    _check_vocab(meta, params, where)
    bos, eos = gguf_tokenizer.special_ids(meta, where)
    tied = "output.weight" not in tensors
    weights = _weights(tensors, params, tied, where)
    blocks = _blocks(tensors, params, tied)
    log.info("read GGUF %s: %d layers, dim %d, vocab %d, %s, bos %s, eos %s%s", path.name,
             params["n_layers"], params["dim"], params["vocab_size"], tokenizer_name, bos, eos,
             ", tied embeddings" if tied else "")
    return canonical.Checkpoint(params, weights, tokenizer_name, tokenizer_bytes, bos, eos,
                                source_format="gguf", tied_embeddings=tied, source_blocks=blocks,
                                chat_template=_chat_template(meta, where))


def _open(path):
    try:
        return GGUFReader(path)
    except OSError as e:
        raise UserError(str(path), f"cannot read the file ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - gguf reports malformed files with assorted exceptions
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(str(path), f"cannot parse it as GGUF ({reason}): truncated, corrupt, or with a "
                                   "tensor type this gguf package does not know; expected a complete "
                                   "GGUF v2/v3 file") from None


def _metadata(reader, where):
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except UnicodeDecodeError as e:
        raise UserError(where, f"a metadata string is not UTF-8 ({e.reason}); the file is corrupt") from None


def _require(meta, key, where):
    if key not in meta:
        raise UserError(where, f"metadata key {key} is missing (expected in a {ARCH} GGUF)")
    return meta[key]


def _float(value):
    # GGUF stores float32; write the shortest decimal of that float32 (1e-05, not 9.9999997e-06).
    return float(str(np.float32(value)))


def _params(meta, tensors, where):
    get = lambda key: _require(meta, f"{ARCH}.{key}", where)  # noqa: E731
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    params = {
        "dim": dim,
        "n_layers": get("block_count"),
        "n_heads": n_heads,
        "n_kv_heads": meta.get(f"{ARCH}.attention.head_count_kv", n_heads),
        "head_dim": meta.get(f"{ARCH}.attention.key_length", dim // n_heads),
        "hidden_dim": get("feed_forward_length"),
        "vocab_size": _vocab_size(tensors, where),
        "norm_eps": _float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float(meta.get(f"{ARCH}.rope.freq_base", 10000.0)),
    }
    rotary = meta.get(f"{ARCH}.rope.dimension_count", params["head_dim"])
    if rotary != params["head_dim"]:
        raise UserError(where, f"{ARCH}.rope.dimension_count is {rotary} but heads are "
                               f"{params['head_dim']} wide; only rope over the whole head is supported")
    params.update(_rope_scaling(meta, tensors, params, where))
    return params


def _vocab_size(tensors, where):
    embedding = tensors.get("token_embd.weight")
    if embedding is None or len(embedding.shape) != 2:
        raise UserError(where, "tensor token_embd.weight is missing or not 2-D (expected [vocab, dim])")
    return int(embedding.shape[1])  # ne1: one row per token


def _rope_scaling(meta, tensors, params, where):
    kind = meta.get(f"{ARCH}.rope.scaling.type", "none")
    if kind != "none":
        raise UserError(where, f"{ARCH}.rope.scaling.type is {kind!r}; only unscaled rope and Llama 3 "
                               f"scaling ({ROPE_FREQS}) are supported")
    if ROPE_FREQS not in tensors:
        return {"use_scaled_rope": False}
    divisors = _dequantize(tensors[ROPE_FREQS], where).double()
    # The canonical form names Llama 3 scaling by two numbers; recover them and prove they give
    # exactly the stored divisors (Llama 3.1 / 3.2 all use high_freq_factor 4).
    factor = _float(float(divisors.max()))
    scaled = {"use_scaled_rope": True, "rope_scale_factor": factor, "high_freq_factor": 4.0}
    expected = rope_frequencies({**params, "use_scaled_rope": False}) / rope_frequencies({**params, **scaled})
    if divisors.shape != expected.shape or not torch.allclose(divisors, expected, rtol=1e-5):
        raise UserError(where, f"{ROPE_FREQS} is not Llama 3 rope scaling (factor {factor}, "
                               "high_freq_factor 4), the only scaled rope supported")
    return scaled


def _gguf_names(n_layers):
    """GGUF tensor name -> canonical name, for a llama of ``n_layers``."""
    names = dict(_TOP_NAMES)
    for i in range(n_layers):
        names.update({f"blk.{i}.{g}.weight": f"layers.{i}.{c}.weight" for g, c in _LAYER_NAMES.items()})
    return names


def _weights(tensors, params, tied, where):
    names = _gguf_names(params["n_layers"])
    unexpected = sorted(set(tensors) - set(names) - {ROPE_FREQS})
    if unexpected:
        raise UserError(where, f"unexpected tensor {unexpected[0]} (not part of a {ARCH} model with "
                               f"{ARCH}.block_count={params['n_layers']})")
    shapes = canonical.expected_shapes(params)
    weights = {}
    for gguf_name, name in names.items():
        if tied and name == "output.weight":
            continue  # shares the embedding, set below
        if gguf_name not in tensors:
            raise UserError(where, f"tensor {gguf_name} is missing (expected in a {ARCH} model with "
                                   f"{ARCH}.block_count={params['n_layers']})")
        tensor = tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if shape != shapes[name]:
            raise UserError(where, f"tensor {gguf_name} has shape {list(shape)} (rows, columns); "
                                   f"the metadata implies {list(shapes[name])}")
        weights[name] = _dequantize(tensor, where)
    if tied:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return weights


def _blocks(tensors, params, tied):
    """The Source of every linear weight (2-D, not the embedding; the embedding's tensor as
    output.weight when tied): its blocks, or its type when not carried."""
    linears = {name: tensors[g] for g, name in _gguf_names(params["n_layers"]).items()
               if g in tensors and name != "tok_embeddings.weight" and len(tensors[g].shape) == 2}
    if tied:
        linears["output.weight"] = tensors["token_embd.weight"]
    source = Source({}, {})
    for name, tensor in linears.items():
        blocks = gguf_blocks.read(tensor)
        if blocks is None:
            source.refused[name] = tensor.tensor_type.name
        else:
            source.blocks[name] = blocks
    return source


def _dequantize(tensor, where):
    if tensor.tensor_type not in SUPPORTED_TYPES:
        raise UserError(where, f"tensor {tensor.name} has type {tensor.tensor_type.name}; supported: "
                               f"{', '.join(t.name for t in SUPPORTED_TYPES)}")
    values = quants.dequantize(tensor.data, tensor.tensor_type)
    # Copied out of the read-only memory map, and float32 whatever the source type.
    return torch.from_numpy(np.array(values, dtype=np.float32))


def _chat_template(meta, where):
    """The default chat template llama.cpp's converter copies from the model's tokenizer config (named
    ones, ``tokenizer.chat_template.<name>``, are not used), or None."""
    template = meta.get(CHAT_TEMPLATE)
    if template is not None and not isinstance(template, str):
        raise UserError(where, f"{CHAT_TEMPLATE} is {type(template).__name__}; expected a string (Jinja text)")
    return template or None


def _check_vocab(meta, params, where):
    n_tokens = len(meta[gguf_tokenizer.TOKENS])
    if n_tokens > params["vocab_size"]:
        raise UserError(where, f"the tokenizer has {n_tokens} tokens but token_embd.weight has only "
                               f"{params['vocab_size']} rows")
    if n_tokens < params["vocab_size"]:
        log.info("%s: %d tokens for %d embedding rows (padded)", where, n_tokens, params["vocab_size"])
