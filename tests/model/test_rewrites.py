import pytest
import torch
from torch import nn

from ane_build.model import rewrites
from ane_build.model.ane_llama import AneLlama, RMSNorm, head_rows
from ane_build.model.reference import rms_norm
from ane_build.util.errors import UserError
from tests import float_bounds
from tests.tiny_llama import tiny_params, tiny_weights


def tiny_model():
    params = tiny_params()
    return AneLlama.from_weights(params, tiny_weights(params))


@pytest.mark.parametrize("out_features, target, max_splits, n", [
    (576, 1024, 8, 1),      # narrower than the target: whole
    (1536, 1024, 8, 1),     # 1536 // 1024 == 1: whole, not 1024 + 512
    (1536, 512, 8, 3),      # the target need not be a power of two of out_features
    (2048, 1024, 8, 2),
    (49152, 1024, 8, 8),    # SmolLM2's LM head: capped at max_splits, 8 x 6144
    (8192, 1024, 4, 4),
])
def test_split_count_follows_the_seed(out_features, target, max_splits, n):
    assert rewrites.split_count(out_features, target, max_splits) == n


def test_split_linear_computes_the_same_as_the_linear():
    linear = nn.Linear(16, 96, bias=False)
    split = rewrites.SplitLinear(linear, 3)
    x = torch.randn(2, 5, 16)
    assert all(type(chunk) is nn.Linear and chunk.out_features == 32 for chunk in split.chunks)
    torch.testing.assert_close(split(x), linear(x))


def test_split_weights_are_separate_tensors_safetensors_can_save(tmp_path):
    from safetensors.torch import save_file

    model = rewrites.apply(tiny_model(), {"dtype": "fp32", "target_split_size": 32, "max_splits": 4})
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))


def test_apply_splits_every_linear_including_the_lm_head():
    model = rewrites.apply(tiny_model(), {"dtype": "fp32", "target_split_size": 32, "max_splits": 4})
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["output.chunks.3.weight"] == (80, 64)  # 320 // 32 = 10 chunks, capped at 4
    assert shapes["layers.1.feed_forward.w1.chunks.3.weight"] == (32, 64)
    assert shapes["layers.0.attention.wk.weight"] == (32, 64)  # one chunk: left a plain Linear
    assert not any(isinstance(m, RMSNorm) for m in model.modules())
    assert sum(isinstance(m, rewrites.SafeRMSNorm) for m in model.modules()) == 5


def test_a_saved_rewritten_state_loads_into_a_rewritten_empty_model():
    ane = {"dtype": "fp16", "target_split_size": 32, "max_splits": 4}
    model = rewrites.apply(tiny_model(), ane)
    rebuilt = rewrites.apply(AneLlama(tiny_params()), ane)
    rebuilt.load_state_dict(model.state_dict(), strict=True, assign=True)
    x = torch.randn(1, 3, 64, dtype=torch.float16)
    torch.testing.assert_close(rebuilt.output(rebuilt.norm(x)), model.output(model.norm(x)))


def test_a_split_size_that_does_not_divide_is_a_user_error_and_changes_nothing():
    model = tiny_model()
    before = set(model.state_dict())
    # w1 (out_features 128) at 24: 128 // 24 = 5 chunks, and 5 does not divide 128.
    with pytest.raises(UserError, match=r"ane\.target_split_size=24.*layers\.0\.feed_forward\.w1.*128"):
        rewrites.apply(model, {"target_split_size": 24, "max_splits": 8}, where="recipes/x.yaml")
    assert set(model.state_dict()) == before


@pytest.mark.parametrize("ane, message", [
    ({"dtype": "bf16"}, "ANE has no bf16"),
    ({"dtype": "int8"}, "expected one of fp16, fp32"),
    ({"target_split_size": 0}, r"ane\.target_split_size=0: expected a positive integer"),
    ({"target_split_size": 32, "max_splits": "8"}, r"ane\.max_splits='8'"),
])
def test_bad_ane_settings_are_user_errors(ane, message):
    with pytest.raises(UserError, match=message):
        rewrites.apply(tiny_model(), ane)


def test_apply_defaults_to_fp16_everywhere():
    model = rewrites.apply(tiny_model(), {})
    assert {t.dtype for t in [*model.parameters(), *model.buffers()]} == {torch.float16}


def test_safe_rms_norm_does_not_overflow_in_fp16():
    gen = torch.Generator().manual_seed(0)
    dim, eps = 576, 1e-5
    weight = 1.0 + 0.1 * torch.randn(dim, generator=gen)
    magnitudes = torch.logspace(3, torch.log10(torch.tensor(3e4)).item(), 8)  # 1e3 .. 3e4
    x = torch.randn(8, dim, generator=gen) * magnitudes[:, None] / 3
    x[:, 0] = magnitudes  # make each row's max-abs the intended magnitude
    expected = rms_norm(x, weight, eps)

    safe = rewrites.SafeRMSNorm(nn.Parameter(weight), eps).half()
    got = safe(x.half())
    assert torch.isfinite(got).all()
    # An output is x * w * (a row's scale). Between the fp32 x, w and it: 7.5 fp16 roundings, each
    # within 2^-11 of its value: x, w, x / m, the product by the scale, by w, the rsqrt, and half
    # each of the square, the mean and + r^2 under the root (m's own rounding cancels). An x / m
    # below fp16's smallest normal number has only an absolute precision, 2^-25 times a row scale
    # under sqrt(576): far inside an atol of that smallest normal number.
    tolerance = {"rtol": 8 * float_bounds.unit_roundoff(torch.float16), "atol": torch.finfo(torch.float16).tiny}
    torch.testing.assert_close(got.float(), expected, **tolerance)
    # The plain form squares in fp16 and is wrong here: the test input does overflow it.
    plain = rms_norm(x.half(), weight.half(), eps).float()
    assert not torch.allclose(plain, expected, **tolerance)


def test_safe_rms_norm_matches_plain_in_fp32_and_maps_zeros_to_zeros():
    weight = nn.Parameter(torch.randn(64))
    safe = rewrites.SafeRMSNorm(weight, 1e-5)
    x = torch.randn(3, 64) * torch.tensor([[1e-3], [1.0], [1e3]])
    torch.testing.assert_close(safe(x), rms_norm(x, weight, 1e-5))
    zeros = torch.zeros(2, 64, dtype=torch.float16)
    assert safe.half()(zeros).eq(0).all()


@pytest.mark.slow
def test_fp16_rewrite_of_the_default_model_keeps_top1_at_64_teacher_forced_positions(smollm2_checkpoint):
    from tokenizers import Tokenizer

    from ane_build.checkpoint import canonical
    from ane_build.model.ane_llama import AneLlama, SlidingCache
    from ane_build.model.reference import ReferenceLlama

    params, weights = canonical.read_params(smollm2_checkpoint), canonical.read_weights(smollm2_checkpoint)
    # Teacher-forced on the fp32 model's own greedy continuation, as the smoke stage scores it.
    reference = ReferenceLlama(params, weights)
    prompt = Tokenizer.from_file(str(smollm2_checkpoint / "tokenizer.json")).encode("Once upon a time,").ids
    ids = prompt + reference.greedy(prompt, 64 - len(prompt))
    expected = reference(torch.tensor([ids]))[0].argmax(-1)
    ane = {"dtype": "fp16", "target_split_size": 1024, "max_splits": 8}
    model = rewrites.apply(AneLlama.from_weights(params, weights), ane)
    cache = SlidingCache(params, 1024, 64, dtype=torch.float16)
    got = torch.stack([cache.step(model, [i], 1)[0].argmax() for i in ids])
    assert got.tolist() == expected.tolist()


def tied_model():
    params = tiny_params()
    weights = tiny_weights(params)
    weights["output.weight"] = weights["tok_embeddings.weight"].clone()
    return AneLlama.from_weights(params, weights)


@pytest.mark.parametrize("split", [None, 32])
def test_a_shared_embedding_reads_the_lm_heads_rows_exactly(split):
    """Each token's row comes from one chunk (the others add exact zeros), so the rows are the table's, bit
    for bit, whether the head is whole or in chunks, for every id including each chunk's first and last."""
    ane = {"dtype": "fp32", "target_split_size": split, "max_splits": 4}
    table = tied_model().tok_embeddings.weight
    shared = rewrites.apply(tied_model(), {**ane, "share_embedding": True})
    assert shared.tok_embeddings is None and not any("tok_embeddings" in name for name in shared.state_dict())
    tokens = torch.arange(tiny_params()["vocab_size"]).reshape(4, -1)
    assert torch.equal(head_rows(shared.output, tokens), table[tokens])


def test_a_shared_embedding_model_computes_what_the_unshared_one_does():
    from ane_build.model import io
    from tests.stages.tiny_entries import ane as tiny_ane

    ane = tiny_ane(dtype="fp32", target_split_size=32, max_splits=4)
    spec = {"params": tiny_params(), "ane": {**ane, "cache_size": ane["max_seq_length"] - 1}}
    inputs = io.example_inputs(spec, "forward", ane["seq_length"])
    shared = rewrites.apply(tied_model(), {**ane, "share_embedding": True})
    unshared = rewrites.apply(tied_model(), ane)
    for got, want in zip(shared(*inputs)[0], unshared(*inputs)[0]):
        assert torch.equal(got, want)


def test_sharing_the_embedding_of_an_untied_checkpoint_is_a_user_error():
    with pytest.raises(UserError, match=r"^recipe: ane.share_embedding: this checkpoint's embedding and LM head "
                                        r"differ"):
        rewrites.apply(tiny_model(), {"dtype": "fp32", "share_embedding": True})
