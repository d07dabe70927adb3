"""The canonical checkpoint every source format converts to, and the only one later stages read.

A canonical checkpoint is a folder with:

- ``params.json``: the seed's params format (fields of ExecuTorch's Llama ``ModelArgs``):
  dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, vocab_size, norm_eps,
  rope_theta, use_scaled_rope (+ rope_scale_factor, high_freq_factor when true).
  Everything is explicit: ``ModelArgs`` defaults ``use_scaled_rope`` to true, which
  would silently change a model that does not use it.
- ``model.safetensors``: weights in Meta names (``tok_embeddings.weight``,
  ``layers.N.attention.wq.weight`` ... ``norm.weight``, ``output.weight``), Q/K in
  Meta's interleaved rotary layout. ``output.weight`` is always present, also for
  tied embeddings, so the seed's loader (which loads with ``strict=False``) gets it.
- the tokenizer: ``tokenizer.model`` (SentencePiece or tiktoken) or ``tokenizer.json`` (HF).
- ``chat_template.jinja`` (a checkpoint with a chat template only): its Jinja text as the checkpoint
  states it (GGUF ``tokenizer.chat_template``, Hugging Face ``chat_template``), beside the tokenizer
  as transformers saves it; later entries and the release bundle carry it with the tokenizer.
- ``checkpoint.json``: tokenizer file name, chat template file name (or null), bos id, eos ids,
  source format, tied flag, and
  for a GGUF with quantized linears ``source_blocks``: which weights have blocks (their GGUF
  type, bits and block size) and which linears' types are not carried.
- ``blocks.safetensors`` (a GGUF with quantized linears only): each linear weight's blocks as
  the file has them (``blocks.py``), for ``quantize.linear: source`` (``ane_build.quant.source_blocks``).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from ane_build.util.errors import UserError

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "checkpoint.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class Checkpoint:
    params: dict
    weights: dict  # Meta name -> torch.Tensor
    tokenizer_name: str | None  # one of TOKENIZER_FILES; None for weights given without one
    tokenizer_bytes: bytes | None
    bos_id: int | None
    eos_ids: list = field(default_factory=list)
    source_format: str = ""
    tied_embeddings: bool = False
    source_blocks: object = None  # ane_build.checkpoint.blocks.Source of a GGUF, else None
    chat_template: str | None = None  # the checkpoint's Jinja chat template, if it states one


def head_dim(params):
    return params.get("head_dim") or params["dim"] // params["n_heads"]


def expected_shapes(params):
    """Weight name -> shape implied by ``params``."""
    dim, hd, hidden = params["dim"], head_dim(params), params["hidden_dim"]
    n_heads, n_kv = params["n_heads"], params.get("n_kv_heads") or params["n_heads"]
    shapes = {
        "tok_embeddings.weight": (params["vocab_size"], dim),
        "norm.weight": (dim,),
        "output.weight": (params["vocab_size"], dim),
    }
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (n_heads * hd, dim),
            p + "attention.wk.weight": (n_kv * hd, dim),
            p + "attention.wv.weight": (n_kv * hd, dim),
            p + "attention.wo.weight": (dim, n_heads * hd),
            p + "feed_forward.w1.weight": (hidden, dim),
            p + "feed_forward.w2.weight": (dim, hidden),
            p + "feed_forward.w3.weight": (hidden, dim),
            p + "attention_norm.weight": (dim,),
            p + "ffn_norm.weight": (dim,),
        })
    return shapes


def check_shapes(params, weights, where):
    """Raise UserError naming the first weight that is missing or whose shape contradicts params."""
    expected = expected_shapes(params)
    for name, shape in expected.items():
        if name not in weights:
            raise UserError(where, f"weight {name} is missing (params.json has n_layers={params['n_layers']})")
        got = tuple(weights[name].shape)
        if got != shape:
            raise UserError(where, f"weight {name} has shape {list(got)}, params.json implies {list(shape)}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise UserError(where, f"unexpected weight {extra[0]} (not in a Llama of these params)")


def write(ckpt, out_dir):
    """Write ``ckpt`` into ``out_dir`` (an empty folder the store will publish)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    weights = {k: v.contiguous() for k, v in ckpt.weights.items()}
    if ckpt.tied_embeddings:
        # safetensors refuses shared storage; the seed's loader needs output.weight anyway.
        weights["output.weight"] = weights["tok_embeddings.weight"].clone()
    check_shapes(ckpt.params, weights, "converted checkpoint")
    save_file(weights, str(out_dir / WEIGHTS_FILE))
    (out_dir / PARAMS_FILE).write_text(json.dumps(ckpt.params, indent=2, sort_keys=True) + "\n")
    if ckpt.tokenizer_name:
        (out_dir / ckpt.tokenizer_name).write_bytes(ckpt.tokenizer_bytes)
    if ckpt.chat_template:
        (out_dir / CHAT_TEMPLATE_FILE).write_bytes(ckpt.chat_template.encode())  # as is: no newline translation
    info = {
        "tokenizer": ckpt.tokenizer_name,
        "chat_template": CHAT_TEMPLATE_FILE if ckpt.chat_template else None,
        "bos_id": ckpt.bos_id,
        "eos_ids": list(ckpt.eos_ids),
        "source_format": ckpt.source_format,
        "tied_embeddings": ckpt.tied_embeddings,
    }
    if ckpt.source_blocks and ckpt.source_blocks.blocks:
        from ane_build.checkpoint import blocks

        blocks.save(ckpt.source_blocks, out_dir)
        info["source_blocks"] = ckpt.source_blocks.info()
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_params(ckpt_dir):
    return json.loads((Path(ckpt_dir) / PARAMS_FILE).read_text())


def read_info(ckpt_dir):
    return json.loads((Path(ckpt_dir) / INFO_FILE).read_text())


def update_info(ckpt_dir, **changes):
    """Rewrite ``checkpoint.json`` with ``changes`` (for a check that needs the written tokenizer)."""
    info = {**read_info(ckpt_dir), **changes}
    (Path(ckpt_dir) / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_weights(ckpt_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt_dir) / WEIGHTS_FILE))
