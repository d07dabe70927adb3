"""A tiny random Llama in canonical (Meta) form, made in-process for tests."""

import base64
import functools
import io
import json
import random
from pathlib import Path

import torch

from ane_build.checkpoint import canonical


def tiny_params(**overrides):
    params = {
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
        "hidden_dim": 128, "vocab_size": 320, "norm_eps": 1e-5, "rope_theta": 10000.0,
        "use_scaled_rope": False,
    }
    params.update(overrides)
    return params


# Wide enough that the weights, not the Core ML program text, make most of an exported file, and
# with a 1024-term reduction (hidden_dim), where rounding inside a dot product shows most.
WIDE = tiny_params(dim=256, head_dim=64, hidden_dim=1024, vocab_size=4096)


def tiny_weights(params, seed=0):
    """Random weights for ``params``; norms near 1 so activations stay in a sane range."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in canonical.expected_shapes(params).items():
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            weights[name] = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    return weights


# --- source-format writers (Hugging Face, Meta) and hermetic tokenizers -----------------------

_WORDS = ("the a one small tiny quick slow brown lazy red blue green cat dog fox bird model engine "
          "apple neural token runs jumps sleeps over under near with and or but not very").split()


def _sentences(n=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def sentencepiece_model(vocab_size=320):
    """Bytes of a SentencePiece BPE model trained in-process (bos 1, eos 2, byte fallback)."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()), model_writer=out, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, num_threads=1, minloglevel=2)
    return out.getvalue()


def tiktoken_model():
    """Bytes of a tiny tiktoken BPE file: the 256 bytes plus a few merges (Llama 3 adds 256 specials)."""
    merges = [b"th", b"he", b"the", b" t", b"in", b"an"]
    ranks = [bytes([i]) for i in range(256)] + merges
    return b"".join(base64.b64encode(tok) + b" %d\n" % rank for rank, tok in enumerate(ranks))


def hf_tokenizer_json():
    """Bytes of a tiny byte-level BPE tokenizer.json trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_sentences(), trainer)
    return tok.to_str().encode()


TOKENIZERS = {  # kind -> (file name, bytes maker)
    "sentencepiece": ("tokenizer.model", sentencepiece_model),
    "tiktoken": ("tokenizer.model", tiktoken_model),
    "tokenizer.json": ("tokenizer.json", hf_tokenizer_json),
}


def write_tokenizer(folder, kind="sentencepiece"):
    name, make = TOKENIZERS[kind]
    path = Path(folder) / name
    path.write_bytes(make())
    return path


_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def meta_to_hf_rotary(w, n_heads, head_dim):
    """What HF's convert_llama_weights_to_hf does to wq / wk: interleaved pairs -> two halves."""
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def hf_weights(params, weights, tied=False):
    hd = canonical.head_dim(params)
    heads = {"attention.wq": params["n_heads"], "attention.wk": params["n_kv_heads"]}
    out = {}
    for name, tensor in weights.items():
        if name in _HF_TOP_NAMES:
            if not (tied and name == "output.weight"):
                out[_HF_TOP_NAMES[name]] = tensor.contiguous()
            continue
        _, i, module = name.split(".", 2)
        module = module.removesuffix(".weight")
        if module in heads:
            tensor = meta_to_hf_rotary(tensor, heads[module], hd)
        out[f"model.layers.{i}.{_HF_LAYER_NAMES[module]}.weight"] = tensor.contiguous()
    return out


def hf_config(params, tied=False):
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": params["dim"], "intermediate_size": params["hidden_dim"],
        "num_hidden_layers": params["n_layers"], "num_attention_heads": params["n_heads"],
        "num_key_value_heads": params["n_kv_heads"], "head_dim": canonical.head_dim(params),
        "vocab_size": params["vocab_size"], "rms_norm_eps": params["norm_eps"],
        "rope_theta": params["rope_theta"], "tie_word_embeddings": tied,
        "max_position_embeddings": 2048, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,  # the SentencePiece fixture's ids
    }
    if params.get("use_scaled_rope"):
        config["max_position_embeddings"] = 131072
        config["rope_scaling"] = {
            "rope_type": "llama3", "factor": params["rope_scale_factor"],
            "high_freq_factor": params["high_freq_factor"], "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        }
    return config


def write_hf(params, weights, folder, shards=1, tokenizer="sentencepiece", tied=False, config=None):
    """A Hugging Face Llama folder; ``config`` entries override the generated config.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**hf_config(params, tied), **(config or {})}, indent=2))
    tensors = hf_weights(params, weights, tied)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s::shards]}
            save_file(part, str(folder / file))
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        write_tokenizer(folder, tokenizer)
    return folder


def meta_params_json(params):
    """Meta's params.json for ``params``: the FFN width stated as multiple_of / ffn_dim_multiplier."""
    base = int(2 * (4 * params["dim"]) / 3)
    out = {
        "dim": params["dim"], "n_layers": params["n_layers"], "n_heads": params["n_heads"],
        "n_kv_heads": params["n_kv_heads"], "vocab_size": params["vocab_size"],
        # Any multiplier giving 0 < width <= hidden_dim rounds up to hidden_dim with this multiple_of.
        "multiple_of": params["hidden_dim"], "ffn_dim_multiplier": params["hidden_dim"] / base,
        "norm_eps": params["norm_eps"], "rope_theta": params["rope_theta"],
        "use_scaled_rope": params["use_scaled_rope"],
    }
    if canonical.head_dim(params) != params["dim"] // params["n_heads"]:
        out["head_dim"] = params["head_dim"]
    if params["use_scaled_rope"]:
        out["rope_scale_factor"] = params["rope_scale_factor"]
        out["high_freq_factor"] = params["high_freq_factor"]
    return out


def write_meta(params, weights, folder, tokenizer="sentencepiece", tied=False, params_json=None):
    """A Meta Llama folder; ``params_json`` entries override the generated params.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps({**meta_params_json(params), **(params_json or {})}))
    tensors = {k: v for k, v in weights.items() if not (tied and k == "output.weight")}
    torch.save(tensors, folder / "consolidated.00.pth")
    if tokenizer:
        write_tokenizer(folder, tokenizer)
    return folder


LLAMA3_ROPE = {"use_scaled_rope": True, "rope_theta": 500000.0, "rope_scale_factor": 32.0, "high_freq_factor": 4.0}
VARIANTS = {  # name -> tiny_params overrides; the default is GQA (4 query heads, 2 kv heads)
    "gqa": {},
    "mha": {"n_kv_heads": 4},
    "head_dim_8": {"head_dim": 8},  # n_heads * head_dim != dim
    "llama3_rope": LLAMA3_ROPE,
}


# --- GGUF writer (llama.cpp layout) ---------------------------------------------------------------

_GGUF_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                   "output.weight": "output.weight"}
_GGUF_LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
    "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm",
}
# GGUF tokenizer key (after "tokenizer.ggml.") -> the GGUFWriter method that writes it.
_GGUF_TOKENIZER_WRITERS = {
    "model": "add_tokenizer_model", "pre": "add_tokenizer_pre", "tokens": "add_token_list",
    "token_type": "add_token_types", "scores": "add_token_scores", "merges": "add_token_merges",
    "bos_token_id": "add_bos_token_id", "eos_token_id": "add_eos_token_id",
    "eot_token_id": "add_eot_token_id", "unknown_token_id": "add_unk_token_id",
    "add_bos_token": "add_add_bos_token", "add_space_prefix": "add_add_space_prefix",
}


def gguf_name(name):
    """The GGUF tensor name of canonical weight ``name``."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    _, i, module = name.split(".", 2)
    return f"blk.{i}.{_GGUF_LAYER_NAMES[module.removesuffix('.weight')]}.weight"


def gguf_vocab_from_sentencepiece(model_bytes):
    """GGUF tokenizer metadata for a SentencePiece model, as llama.cpp's converter writes it."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    proto = spm.ModelProto.FromString(model_bytes)
    spec = proto.trainer_spec
    return {
        "model": "llama", "tokens": [p.piece for p in proto.pieces],
        "scores": [p.score for p in proto.pieces], "token_type": [int(p.type) for p in proto.pieces],
        "bos_token_id": spec.bos_id,
        "eos_token_id": spec.eos_id, "unknown_token_id": spec.unk_id,
        "add_space_prefix": proto.normalizer_spec.add_dummy_prefix,
    }


def gguf_vocab_from_tokenizer_json(json_bytes, pre="gpt2", bos="<s>", eos="</s>"):
    """GGUF tokenizer metadata for a byte-level BPE tokenizer.json, as llama.cpp's converter writes it."""
    spec = json.loads(json_bytes)
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = sorted(vocab, key=vocab.get)
    added = {t["content"]: t["special"] for t in spec["added_tokens"]}
    types = [(3 if added[t] else 4) if t in added else 1 for t in tokens]  # CONTROL / USER_DEFINED / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "token_type": types, "merges": merges,
            "bos_token_id": vocab[bos], "eos_token_id": vocab[eos]}


_GGUF_VOCABS = {  # write_gguf's tokenizer kinds, the same files write_hf / write_meta use
    "sentencepiece": lambda: gguf_vocab_from_sentencepiece(sentencepiece_model()),
    "tokenizer.json": lambda: gguf_vocab_from_tokenizer_json(hf_tokenizer_json()),
}


def llama3_rope_freqs(params):
    """rope_freqs.weight as llama.cpp's converter computes it for Llama 3 scaling: a divisor per frequency."""
    import math

    hd, factor, high = canonical.head_dim(params), params["rope_scale_factor"], params["high_freq_factor"]
    low, context = 1.0, 8192
    divisors = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * params["rope_theta"] ** (i / hd)
        if wavelen < context / high:
            divisors.append(1.0)
        elif wavelen > context / low:
            divisors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(divisors, dtype=torch.float32)


def _pad_vocab(vocab, size):
    # llama.cpp's converter fills a vocabulary smaller than the embedding with unused [PADn] tokens.
    vocab = dict(vocab)
    n = size - len(vocab["tokens"])
    vocab["tokens"] = vocab["tokens"] + [f"[PAD{i}]" for i in range(n)]
    vocab["token_type"] = vocab["token_type"] + [5] * n  # UNUSED
    if "scores" in vocab:
        vocab["scores"] = vocab["scores"] + [-1000.0] * n
    return vocab


def write_gguf(params, weights, path, qtype="F32", tokenizer="sentencepiece", tied=False, arch="llama",
               raw=None, metadata=None):
    """Write the tiny model as a llama.cpp GGUF: 2-D weights in ``qtype`` (a GGMLQuantizationType
    name gguf can quantize to), norms in F32, no output.weight when ``tied``.

    ``tokenizer``: "sentencepiece", "tokenizer.json" (the files write_hf writes, converted as
    llama.cpp does), GGUF tokenizer metadata (keys after "tokenizer.ggml.") or None for none.
    ``raw``: canonical name -> (uint8 blocks, type name) written as is, for types gguf cannot
    quantize to. ``metadata``: extra keys (str / int / float values).
    Weights missing from ``weights`` are not written. Returns what a reader should recover:
    canonical name -> fp32 tensor dequantized from what was written.
    """
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(str(path), arch)
    hd = canonical.head_dim(params)
    writer.add_context_length(2048)
    writer.add_block_count(params["n_layers"])
    writer.add_embedding_length(params["dim"])
    writer.add_feed_forward_length(params["hidden_dim"])
    writer.add_head_count(params["n_heads"])
    writer.add_head_count_kv(params["n_kv_heads"])
    writer.add_layer_norm_rms_eps(params["norm_eps"])
    writer.add_rope_freq_base(params["rope_theta"])
    writer.add_rope_dimension_count(hd)
    if hd != params["dim"] // params["n_heads"]:
        writer.add_key_length(hd)
        writer.add_value_length(hd)
    writer.add_vocab_size(params["vocab_size"])
    if tokenizer is not None:
        vocab = _GGUF_VOCABS[tokenizer]() if isinstance(tokenizer, str) else tokenizer
        for key, value in _pad_vocab(vocab, params["vocab_size"]).items():
            getattr(writer, _GGUF_TOKENIZER_WRITERS[key])(value)
    for key, value in (metadata or {}).items():
        add = {str: writer.add_string, int: writer.add_uint32, float: writer.add_float32}[type(value)]
        add(key, value)

    written = {}
    for name, tensor in weights.items():
        if tied and name == "output.weight":
            continue
        if raw and name in raw:
            data, kind = raw[name][0], GGMLQuantizationType[raw[name][1]]
        else:
            kind = GGMLQuantizationType[qtype if tensor.dim() == 2 else "F32"]
            data = quants.quantize(tensor.float().numpy(), kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=kind)
        written[name] = torch.from_numpy(quants.dequantize(data, kind).astype("float32"))
    if tied and "tok_embeddings.weight" in written:
        written["output.weight"] = written["tok_embeddings.weight"]
    if params.get("use_scaled_rope"):
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(params).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
