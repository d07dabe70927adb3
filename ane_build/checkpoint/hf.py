"""Hugging Face Llama folders (config.json, *.safetensors, tokenizer, chat template) -> canonical checkpoint."""

import logging
from pathlib import Path

from ane_build.checkpoint import canonical, jsonfiles, tokenizer_files
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# tokenizer.json first: it is what transformers itself loads when both are present.
TOKENIZER_PREFERENCE = ("tokenizer.json", "tokenizer.model")
TOKENIZER_CONFIG = "tokenizer_config.json"
SUPPORTED = 'LlamaForCausalLM (model_type "llama")'

_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def read(folder):
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    config = jsonfiles.read(config_path)
    check_architecture(config, config_path)
    params = params_from_config(config, config_path)
    # The tokenizer before the weights: a bad one fails in a second, not after gigabytes.
    tok = tokenizer_files.load(tokenizer_files.find(folder, TOKENIZER_PREFERENCE))
    bos, eos = _special_ids(folder, config, tok)
    tied = bool(config.get("tie_word_embeddings", False))
    weights = _meta_names(_load_safetensors(folder), folder)
    if tied and "tok_embeddings.weight" in weights:
        # transformers ties lm_head to the embedding whether or not the file also stores lm_head.
        weights["output.weight"] = weights["tok_embeddings.weight"]
    canonical.check_shapes(params, weights, str(config_path))
    _undo_rotary_permutation(weights, params)
    log.info("read Hugging Face Llama: %d layers, %s, bos %s, eos %s",
             params["n_layers"], tok.path.name, bos, eos)
    return canonical.Checkpoint(params, weights, tok.path.name, tok.path.read_bytes(), bos, eos,
                                source_format="hf", tied_embeddings=tied, chat_template=chat_template(folder))


def check_architecture(config, path):
    archs = config.get("architectures") or ["LlamaForCausalLM"]  # optional in config.json
    model_type = config.get("model_type", "llama")
    if archs != ["LlamaForCausalLM"] or model_type != "llama":
        raise UserError(str(path), f"architecture {', '.join(map(str, archs))} (model_type {model_type!r}) "
                                   f"is not supported; expected {SUPPORTED}")


def params_from_config(config, path):
    """Canonical params from a config.json; defaults are LlamaConfig's."""
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UserError(str(path), f"{key} is true; only bias-free Llama projections are supported")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(str(path), f"hidden_act is {config['hidden_act']!r}; Llama uses 'silu'")
    dim = jsonfiles.require(config, "hidden_size", path)
    n_heads = jsonfiles.require(config, "num_attention_heads", path)
    params = {
        "dim": dim,
        "n_layers": jsonfiles.require(config, "num_hidden_layers", path),
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "head_dim": config.get("head_dim") or dim // n_heads,
        "hidden_dim": jsonfiles.require(config, "intermediate_size", path),
        "vocab_size": jsonfiles.require(config, "vocab_size", path),
        "norm_eps": config.get("rms_norm_eps", 1e-6),
    }
    params.update(_rope_params(config, path))
    return params


def _rope_params(config, path):
    # Hub configs carry rope_theta + rope_scaling; transformers 5 writes both into rope_parameters.
    rope = {**(config.get("rope_parameters") or {}), **(config.get("rope_scaling") or {})}
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta, "use_scaled_rope": False}
    if kind != "llama3":
        raise UserError(str(path), f"rope_scaling rope_type {kind!r} is not supported; "
                                   "expected none, 'default' or 'llama3'")
    # The canonical (ExecuTorch) rope formula hardcodes these two Llama 3.x values.
    for key, fixed in (("low_freq_factor", 1.0), ("original_max_position_embeddings", 8192)):
        if rope.get(key) != fixed:
            raise UserError(str(path), f"rope_scaling {key} is {rope.get(key)}; only {fixed} "
                                       "(the Llama 3.x value) is supported")
    return {
        "rope_theta": theta,
        "use_scaled_rope": True,
        "rope_scale_factor": float(jsonfiles.require(rope, "factor", path)),
        "high_freq_factor": float(jsonfiles.require(rope, "high_freq_factor", path)),
    }


def _weight_files(folder):
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = jsonfiles.require(jsonfiles.read(index), "weight_map", index)
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise UserError(str(f), f"missing (listed in {INDEX_FILE})")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = " (pytorch_model*.bin is not read: it is a pickle; convert it to safetensors)" \
            if any(folder.glob("pytorch_model*.bin")) else ""
        raise UserError(str(folder / "model.safetensors"), "missing: no *.safetensors weights" + bins)
    return files


def _load_safetensors(folder):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for f in _weight_files(folder):
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise UserError(str(f), f"not a readable safetensors file ({e})") from None
    return tensors


def _meta_names(hf_weights, folder):
    weights = {}
    for name, tensor in hf_weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some older exports saved; recomputed from rope_theta
        weights[_meta_name(name, folder)] = tensor
    return weights


def _meta_name(name, folder):
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")  # model.layers.<i>.<module>.<proj>.weight
    module = ".".join(parts[3:-1])
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight" and module in _LAYER_NAMES:
        return f"layers.{parts[2]}.{_LAYER_NAMES[module]}.weight"
    raise UserError(str(folder), f"unexpected tensor {name} (not part of a {SUPPORTED})")


def hf_to_meta_rotary(w, n_heads, head_dim):
    """Undo the Q/K row permutation of HF's Llama conversion.

    Meta rotates interleaved pairs (rows 2i, 2i+1 of a head); HF's rotate_half pairs row i
    with row i + head_dim/2, so the conversion moved each head's even rows first.
    """
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(n_heads * head_dim, -1)


def _undo_rotary_permutation(weights, params):
    hd = canonical.head_dim(params)
    for i in range(params["n_layers"]):
        for proj, heads in (("wq", params["n_heads"]), ("wk", params["n_kv_heads"])):
            name = f"layers.{i}.attention.{proj}.weight"
            weights[name] = hf_to_meta_rotary(weights[name], heads, hd)


def chat_template(folder):
    """The folder's chat template as transformers finds it: ``chat_template.jinja`` (what it saves
    since 4.47), else ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates of
    which it takes "default"); None without one."""
    saved = folder / canonical.CHAT_TEMPLATE_FILE
    if saved.is_file():
        try:
            return saved.read_bytes().decode()
        except UnicodeDecodeError as e:
            raise UserError(str(saved), f"not UTF-8 text ({e.reason})") from None
    config_path = folder / TOKENIZER_CONFIG
    template = jsonfiles.read(config_path).get("chat_template") if config_path.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UserError(str(config_path), f"chat_template names templates {', '.join(map(str, named))} "
                                              "but none \"default\", the one a chat without tools uses")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise UserError(str(config_path), f"chat_template is {type(template).__name__}; expected a string "
                                          "(Jinja text) or a list of {name, template}")
    return template or None


def _special_ids(folder, config, tok):
    """bos and the eos list: generation_config.json, then config.json, then the tokenizer itself."""
    gen_path = folder / "generation_config.json"
    sources = ([jsonfiles.read(gen_path)] if gen_path.is_file() else []) + [config]
    bos = next((s["bos_token_id"] for s in sources if s.get("bos_token_id") is not None), tok.bos_id)
    eos = []
    for s in sources:
        ids = s.get("eos_token_id")
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and i not in eos:
                eos.append(i)
    if not eos:
        eos = list(tok.eos_ids)
    if not eos:
        log.warning("%s: no eos_token_id in config.json or generation_config.json", folder)
    return bos, eos
