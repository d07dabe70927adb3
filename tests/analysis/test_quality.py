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
    assert len(text.split()) > 5000 and "name" in text
    assert [topic for topic, _ in quality.eval_chapters()] == list(quality.EVAL_TOPICS)


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


def tiny_program_and_tokenizer(inputs):
    export_dir = inputs["export"]
    return PteProgram(export_dir / TWIN_FILE), Tokenizer(export_dir / io.read_spec(export_dir)["tokenizer"])


def test_the_text_is_cut_into_windows_of_the_cache_size_each_chapter_starting_one(fp32):
    program, tokenizer = tiny_program_and_tokenizer(fp32)
    cache = program.info.cache_size
    chapters = [tokenizer.prompt_ids(text, program.info) for _, text in quality.eval_chapters()]
    first = chapters[0]
    windows = quality.eval_windows(tokenizer, program.info, 2 * cache + 6)
    assert windows == [first[:cache], first[cache:2 * cache], first[2 * cache:2 * cache + 6]]
    # A first chapter's last piece ends its window; the next chapter starts a new one, bos first.
    everything = quality.eval_windows(tokenizer, program.info, 10 ** 9)
    after_first = -(-len(first) // cache) - (len(first) % cache == 1)
    assert everything[after_first] == chapters[1][:cache]
    assert sum(map(len, everything)) >= sum(map(len, chapters)) - len(chapters)
    # A shorter evaluation reads the same windows, the last one cut short: another program's prefix.
    assert quality.eval_windows(tokenizer, program.info, cache + 5) == [first[:cache], first[cache:cache + 5]]


def test_each_window_is_read_from_an_empty_cache(fp32):
    """Three windows: had the program carried its cache from one to the next, the second and third would
    see other tokens than the reference does and their agreement would fall (the first bound above)."""
    cache = tiny_program_and_tokenizer(fp32)[0].info.cache_size
    result = score(fp32, 2 * cache + 6)
    assert (result["windows"], result["tokens"], result["positions"]) == (3, 2 * cache + 6, 2 * cache + 3)
    assert result["top1_agreement"] >= 0.9
    assert 0 <= result["mean_kld"] <= result["max_kld"] <= 2 * float_bounds.TINY_FP32_ATOL


def test_no_paragraph_the_evaluation_reads_is_in_the_calibration_text():
    """Python's reference prints some paragraphs in two chapters (``execmodel`` holds all of ``naming``)."""
    from ane_build.quant import calibration_text

    text = calibration_text.pydoc_text(quality.held_out_topics())
    scored = [p.strip() for _, chapter in quality.eval_chapters() for p in chapter.split("\n\n")]
    assert not [p for p in scored if len(p) >= 200 and p in text]
    assert {"naming", "execmodel", *quality.EVAL_TOPICS} <= quality.held_out_topics()
