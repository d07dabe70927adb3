"""The rewritten model on disk (the rewrite stage's entry), and the inputs its programs take.

A rewrite entry holds ``spec.json`` (model params, the resolved ``ane:`` settings, tokenizer
name, chat template name or null, bos/eos ids) and ``model.safetensors`` (the rewritten
module's state dict, in its own names: ``layers.0.feed_forward.w1.chunks.1.weight`` ...).
Later stages copy ``spec.json`` forward and add their own keys to it, so every entry is read
with ``read_spec``.
"""

import json
import shutil
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from ane_build.checkpoint import canonical
from ane_build.model import rewrites
from ane_build.model.ane_llama import AneLlama, attention_mask, empty_caches, rope_table

SPEC_FILE = "spec.json"
PARAMS_FILE = "params.json"  # the model's params, as upstream's runners read them (ModelArgs)
STATE_FILE = "model.safetensors"
DECODE_SEQ_LENGTH = 1
VERIFY = "verify"  # the method that returns every position's logits


def write_spec(spec, out_dir):
    (Path(out_dir) / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def write_params(spec, out_dir):
    """``params.json`` beside a program: what upstream's runners build their ``ModelArgs`` from."""
    (Path(out_dir) / PARAMS_FILE).write_text(json.dumps(spec["params"], indent=2, sort_keys=True) + "\n")


def read_spec(entry):
    return json.loads((Path(entry) / SPEC_FILE).read_text())


def copy_tokenizer(tokenizer, src_dir, out_dir):
    """Carry the tokenizer file forward, and the chat template beside it where the checkpoint has one
    (spec.json's ``chat_template``), so each entry is complete without its upstream.

    Weights given by flags (``ane-build export -p -c``) may come without one.
    """
    if tokenizer:
        shutil.copyfile(Path(src_dir) / tokenizer, Path(out_dir) / tokenizer)
    if (Path(src_dir) / canonical.CHAT_TEMPLATE_FILE).is_file():
        shutil.copyfile(Path(src_dir) / canonical.CHAT_TEMPLATE_FILE, Path(out_dir) / canonical.CHAT_TEMPLATE_FILE)


def save_state(model, out_dir):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out_dir) / STATE_FILE))


def load_model(entry):
    """The rewritten model of a rewrite entry, in its dtype, ready to run or quantize."""
    from safetensors.torch import load_file

    spec = read_spec(entry)
    # Rebuilding the same module tree on the meta device, then assigning the saved tensors,
    # gives the saved model back without computing a split or a cast twice.
    model = rewrites.apply(AneLlama(spec["params"]), spec["ane"], where="")
    model.load_state_dict(load_file(str(Path(entry) / STATE_FILE)), strict=True, assign=True)
    return model.eval().requires_grad_(False)


def methods(ane):
    """{method name: tokens per call}, upstream's names: with a decode method, ``forward`` decodes one
    token and ``prefill`` takes seq_length; without, ``forward`` takes seq_length (the seed's). A
    verify method (``VERIFY``) takes seq_length and returns every position's logits."""
    out = {"forward": DECODE_SEQ_LENGTH, "prefill": ane["seq_length"]} if ane["decode_method"] else \
        {"forward": ane["seq_length"]}
    if ane.get("verify_method"):
        out[VERIFY] = ane["seq_length"]
    return out


def example_inputs(spec, method, seq_length):
    """Inputs of the static shapes ``method`` takes for ``seq_length`` tokens: a first call, empty caches."""
    ane, dtype = spec["ane"], rewrites.DTYPES[spec["ane"]["dtype"]]
    k_caches, v_caches = empty_caches(spec["params"], ane["cache_size"], ane["use_cache_list"], dtype)
    freqs_cos, freqs_sin = rope_table(spec["params"], seq_length, dtype)
    inputs = (torch.zeros((1, seq_length), dtype=torch.int32), attention_mask(seq_length, ane["cache_size"], dtype=dtype),
              freqs_cos, freqs_sin, k_caches, v_caches)
    return inputs if method == VERIFY else (*inputs, torch.tensor([seq_length - 1]))


def flat_inputs(args):
    """The flat list of tensors an ExecuTorch method takes for ``args`` (it accepts no nested lists)."""
    return pytree.tree_leaves(args)


def runner_metadata(spec):
    """What a runner needs to drive the program, as ExecuTorch constant methods.

    Ids a checkpoint does not state are left out: a missing method is clearer to a runner
    than a sentinel value.
    """
    params, ane = spec["params"], spec["ane"]
    meta = {
        "seq_length": ane["seq_length"],
        "max_seq_length": ane["max_seq_length"],
        "cache_size": ane["cache_size"],
        "n_layers": params["n_layers"],
        "n_kv_heads": params.get("n_kv_heads") or params["n_heads"],
        "head_dim": canonical.head_dim(params),
        "dtype": ane["dtype"],
        "vocab_size": params["vocab_size"],
        "use_cache_list": ane["use_cache_list"],
    }
    if spec.get("bos_id") is not None:
        meta["bos_id"] = spec["bos_id"]
    if spec.get("eos_ids"):
        meta["eos_ids"] = list(spec["eos_ids"])
    return meta


def constant_methods(spec):
    """The program's constant methods: ``runner_metadata``, and the rotary table as ``freqs_cos`` and
    ``freqs_sin`` [max_seq_length, head_dim / 2] in the program's dtype (upstream's names and form),
    from which a runner slices each call's rows."""
    cos, sin = rope_table(spec["params"], spec["ane"]["max_seq_length"], rewrites.DTYPES[spec["ane"]["dtype"]])
    return {**runner_metadata(spec), "freqs_cos": cos, "freqs_sin": sin}
