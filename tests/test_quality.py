import hashlib

import pytest

from ane_build import pipeline, quality
from tests.stages.tiny_export import tiny_recipe


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
