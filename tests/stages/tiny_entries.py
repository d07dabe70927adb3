"""Store entries of the tiny Llama for the rewrite, quantize and export stages, made in-test."""

import torch
from torch.utils import _pytree as pytree

from ane_build.checkpoint import canonical
from ane_build.model import io
from ane_build.model.ane_llama import attention_mask, rope_table
from ane_build.model.rewrites import DTYPES
from ane_build.stages import export, quantize, rewrite
from tests.tiny_llama import tiny_params, tiny_weights

# These stages copy the tokenizer forward and never read it.
TOKENIZER = ("tokenizer.json", b'{"tiny": "tokenizer"}')
STAGES = {"rewrite": rewrite, "quantize": quantize, "export": export}
UPSTREAM = {"rewrite": "convert", "quantize": "rewrite", "export": "quantize"}


def ane(**overrides):
    """A short context (8-token calls, 32 positions) whose split size cuts the tiny model's wide layers."""
    return {"dtype": "fp16", "seq_length": 8, "max_seq_length": 32, "cache_size": None,
            "use_cache_list": True, "target_split_size": 64, "max_splits": 8, "decode_method": False,
            **overrides}


def convert_entry(folder, params=None):
    params = params or tiny_params()
    folder.mkdir(parents=True)
    ckpt = canonical.Checkpoint(params, tiny_weights(params), *TOKENIZER, bos_id=1, eos_ids=[2, 3])
    canonical.write(ckpt, folder)
    return folder


def build(root, until, ane_params=None, quantize_params=None, export_params=None, model_params=None):
    """Run a tiny convert entry through the stages up to ``until``.

    Returns ({stage: entry dir}, {stage: the metrics its run returned}).
    """
    params = {"rewrite": ane_params or ane(), "quantize": quantize_params or {"linear": "c4w"},
              "export": export_params or {}}
    entries, metrics = {"convert": convert_entry(root / "convert", model_params)}, {}
    for stage, module in STAGES.items():
        entries[stage] = root / stage
        entries[stage].mkdir()
        upstream = {UPSTREAM[stage]: entries[UPSTREAM[stage]]}
        metrics[stage] = module.run(upstream, params[stage], entries[stage])
        if stage == until:
            break
    return entries, metrics


def later_call_inputs(spec, seq_length, seed=0, method=None):
    """Inputs of a call of ``method`` past the start: random cached rows, half the cache open, a short
    input (a verify call takes no last_valid_token_pos: it returns every position's logits).

    Exercises what a first call (empty caches, all cache columns masked) would not: the
    cache read, the mask, the rotary rows of later positions and the last-real-token logits.
    """
    gen = torch.Generator().manual_seed(seed)
    dtype, cache_size = DTYPES[spec["ane"]["dtype"]], spec["ane"]["cache_size"]
    tokens, _, _, _, k_caches, v_caches, _ = io.example_inputs(spec, "prefill", seq_length)
    k_caches, v_caches = pytree.tree_map(lambda c: torch.randn(c.shape, generator=gen).to(dtype),
                                         (k_caches, v_caches))
    filled = cache_size // 2
    cos, sin = (table[filled:filled + seq_length] for table in rope_table(spec["params"], filled + seq_length, dtype))
    inputs = (torch.randint(0, spec["params"]["vocab_size"], tokens.shape, generator=gen, dtype=torch.int32),
              attention_mask(seq_length, cache_size, filled, dtype), cos, sin, k_caches, v_caches)
    return inputs if method == io.VERIFY else (*inputs, torch.tensor([max(seq_length - 3, 0)]))
