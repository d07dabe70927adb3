"""rewrite: canonical checkpoint + recipe ``ane:`` -> the ANE-friendly model's state and its spec.

The entry is everything later stages need (they never read the convert entry):
``model.safetensors`` (the rewritten module's state), ``spec.json`` (see
``ane_build.model.io``) and the tokenizer file; for a checkpoint with quantized blocks (a
GGUF), ``blocks.safetensors`` under the rewritten names too (``ane_build.checkpoint.blocks``).
"""

import logging
from pathlib import Path

from ane_build.checkpoint import blocks as checkpoint_blocks
from ane_build.checkpoint import canonical
from ane_build.model import io, rewrites
from ane_build.model.ane_llama import AneLlama
from ane_build.schema import SCHEMA, cache_size
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)


def resolve(params):
    """The ``ane:`` settings with schema defaults filled in and cache_size made explicit."""
    ane = {key: params.get(key, field.default) for key, field in SCHEMA["ane"].items()}
    ane["cache_size"] = cache_size(ane)
    # The recipe checks this for recipes; repeated here for callers of run() without one.
    if not 1 <= ane["cache_size"] < ane["max_seq_length"]:
        raise UserError("", f"ane.cache_size={ane['cache_size']}: expected 1 <= cache_size < "
                            f"max_seq_length = {ane['max_seq_length']}")
    return ane


def run(inputs, params, out_dir):
    """inputs: {"convert": canonical checkpoint dir}; params: the recipe's ``ane:`` mapping."""
    ckpt_dir, out_dir = Path(inputs["convert"]), Path(out_dir)
    ane = resolve(params)
    model_params = canonical.read_params(ckpt_dir)
    info = canonical.read_info(ckpt_dir)
    weights = canonical.read_weights(ckpt_dir)
    canonical.check_shapes(model_params, weights, str(ckpt_dir / canonical.WEIGHTS_FILE))

    model = AneLlama.from_weights(model_params, weights)
    # where="": UserErrors name the recipe key (ane.<field>); the pipeline prefixes the file.
    model = rewrites.apply(model, ane, where="")
    log.info("rewrote the model: %s, %d layers split", ane["dtype"], _split_layers(model))

    io.save_state(model, out_dir)
    blocks = checkpoint_blocks.load(ckpt_dir)
    if blocks:
        checkpoint_blocks.save(checkpoint_blocks.rewritten(blocks, model), out_dir)
    io.copy_tokenizer(info["tokenizer"], ckpt_dir, out_dir)
    io.write_spec({
        "params": model_params,
        "ane": ane,
        "tokenizer": info["tokenizer"],
        "chat_template": info.get("chat_template"),  # copied with the tokenizer (io.copy_tokenizer)
        "bos_id": info["bos_id"],
        "eos_ids": info["eos_ids"],
    }, out_dir)
    return {
        "n_params": sum(t.numel() for t in model.state_dict().values()),
        "split_layers": _split_layers(model),
        "cache_size": ane["cache_size"],
    }


def _split_layers(model):
    return sum(isinstance(m, rewrites.SplitLinear) for m in model.modules())
