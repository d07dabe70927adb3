import hashlib

import pytest

from ane_build import pipeline
from ane_build.analysis import quality
from ane_build.model import io
from ane_build.model.reference import ReferenceLlama
from ane_build.runtime.program import PteProgram
from ane_build.runtime.tokenizer import Tokenizer
from ane_build.stages.export import TWIN_FILE
from ane_build.util.errors import UserError
from tests import float_bounds
from tests.stages.tiny_export import convert_entry, entries, tiny_recipe
from tests.tiny_llama import tiny_params, tiny_weights


def test_the_evaluation_text_is_english_prose_pinned_by_its_hash():
    text, digest = quality.eval_text()
    assert digest == hashlib.sha256(text.encode()).hexdigest()
    assert len(text.split()) > 500 and "name" in text


@pytest.mark.parametrize(("generated", "loop"), [
    ([5, 7, 9, 3, 3, 3], ([3], 3)),  # half of it one token: degenerate
    ([5, 3, 3, 3, 3, 3], ([3], 5)),
    ([4, 4], ([4], 2)),
    ([1, 2, 5, 6, 7, 5, 6, 7, 5, 6, 7], ([5, 6, 7], 3)),  # a phrase three times over
    ([0] + [1, 2, 3, 4, 5, 6, 7, 8] * 3, ([1, 2, 3, 4, 5, 6, 7, 8], 3)),  # the longest loop looked for
    ([1, 2, 3, 4, 5, 6, 7, 8, 9] * 3, None),  # longer: not looked for
    ([5, 7, 9, 8, 3, 3], None),  # a doubled token at the end is English ("...ll")
    ([1, 5, 6, 7, 5, 6, 7], None),  # a phrase said twice can be prose
    ([3, 3, 5, 7], None),
    ([3], None),
])
def test_a_generation_falling_into_a_loop_is_found(generated, loop):
    assert quality.repeating_tail(generated) == loop


def test_the_smoke_key_changes_with_the_evaluation_text(monkeypatch):
    stage, rec = pipeline.BY_NAME["smoke"], tiny_recipe()
    before = pipeline.key_params(stage, rec, None)
    monkeypatch.setattr(quality, "eval_text", lambda: ("other prose", "0" * 64))
    assert pipeline.key_params(stage, rec, None) == {**before, "eval_text_sha256": "0" * 64} != before


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return entries(tmp_path_factory, "fp32")


def score(inputs, n_tokens):
    export_dir = inputs["export"]
    program = PteProgram(export_dir / TWIN_FILE)
    tokenizer = Tokenizer(export_dir / io.read_spec(export_dir)["tokenizer"])
    reference = ReferenceLlama.from_checkpoint(inputs["convert"])
    return quality.score_text(program, tokenizer, reference, n_tokens)


def test_the_checkpoints_own_weights_score_high(fp32):
    """An fp32 twin's logits are within TINY_FP32_ATOL of the reference's, so each log-probability
    within twice that, and so is a KL divergence (a mean of log-probability differences). Top-1
    can flip only where two logits are that close: at most a few of 29 positions."""
    result = score(fp32, 30)
    assert result["positions"] == 29 and result["top1_agreement"] >= 0.9
    assert 0 <= result["mean_kld"] <= result["max_kld"] <= 2 * float_bounds.TINY_FP32_ATOL


def test_other_weights_than_the_checkpoints_score_low(fp32, tmp_path):
    other = convert_entry(tmp_path / "other", tiny_weights(tiny_params(), seed=1))
    result = score({**fp32, "convert": other}, 30)
    assert result["finite"] and result["top1_agreement"] < 0.5 and result["mean_kld"] > 0.1


def test_a_broken_program_is_not_finite(tmp_path_factory):
    assert score(entries(tmp_path_factory, "nan"), 30)["finite"] is False


def test_a_text_of_one_token_is_refused(fp32):
    with pytest.raises(UserError, match=r"^smoke.eval_tokens: 1 token\(s\) score no position"):
        score(fp32, 1)
