"""ReferenceLlama (the fp32 yardstick) against Hugging Face transformers on the same tiny model."""

import pytest
import torch

from ane_build.checkpoint import hf
from ane_build.model.reference import ReferenceLlama
from tests import float_bounds
from tests.tiny_llama import VARIANTS, tiny_params, tiny_weights, write_hf

transformers = pytest.importorskip("transformers")
SEQ = 48


def _hf_and_reference(tmp_path, overrides, tied=False):
    params = tiny_params(**overrides)
    weights = tiny_weights(params, seed=1)
    if tied:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    folder = write_hf(params, weights, tmp_path, tied=tied)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    ckpt = hf.read(folder)
    return model.eval(), ckpt


def _tokens(vocab):
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variant", sorted(VARIANTS) + ["tied"])
def test_logits_match_transformers(tmp_path, variant):
    model, ckpt = _hf_and_reference(tmp_path, VARIANTS.get(variant, {}), tied=variant == "tied")
    tokens = _tokens(ckpt.params["vocab_size"])
    with torch.no_grad():
        want = model(tokens).logits
    got = ReferenceLlama(ckpt.params, ckpt.weights)(tokens)
    assert (got - want).abs().max() < float_bounds.TINY_FP32_ATOL


def test_llama3_rope_scaling_is_visible_in_logits(tmp_path):
    """The llama3 case above would prove nothing if scaling did not move the logits by more than 1e-4."""
    model, ckpt = _hf_and_reference(tmp_path, VARIANTS["llama3_rope"])
    tokens = _tokens(ckpt.params["vocab_size"])
    with torch.no_grad():
        want = model(tokens).logits
    unscaled = ReferenceLlama({**ckpt.params, "use_scaled_rope": False}, ckpt.weights)(tokens)
    assert (unscaled - want).abs().max() > 1e-3
