import pytest

from ane_build.runtime.generate import Generation
from ane_build.runtime.program import open_eager
from ane_build.runtime.sampling import Sampler
from ane_build.util.errors import UserError
from tests.model.test_ane_llama import tokens_for
from tests.runtime.tiny_programs import CACHE, MAX, SEQ
from tests.tiny_llama import tiny_params

PROMPT = tokens_for(tiny_params(), 11)


@pytest.fixture(scope="module")
def program(checkpoint):
    return open_eager(checkpoint, seq_length=SEQ, max_seq_length=MAX, cache_size=CACHE)


def greedy(program, prompt=PROMPT, **kwargs):
    generation = Generation(program, prompt, Sampler(0.0), **kwargs)
    return list(generation), generation


def test_generation_fills_the_context_and_no_more(program):
    tokens, generation = greedy(program)
    assert len(PROMPT) + len(tokens) == MAX
    assert generation.cache.pos == MAX - 1  # the last token is given, never fed
    stats = generation.stats
    assert (stats.prompt_tokens, stats.generated_tokens, stats.decode_calls) == (11, MAX - 11, MAX - 12)
    assert stats.prefill_tokens_per_second > 0 and stats.decode_tokens_per_second > 0


def test_n_steps_and_stop_tokens_end_generation(program):
    tokens, _ = greedy(program)
    assert greedy(program, n_steps=5)[0] == tokens[:5]
    stop = next(i for i, t in enumerate(tokens) if t not in tokens[:i] and i >= 3)
    assert greedy(program, stop_ids=[tokens[stop]])[0] == tokens[:stop]


def test_a_prompt_one_short_of_the_context_generates_one_token(program):
    assert len(greedy(program, tokens_for(tiny_params(), MAX - 1))[0]) == 1


@pytest.mark.parametrize("prompt_length", [MAX, MAX + 5])
def test_a_prompt_that_fills_the_context_is_refused(program, prompt_length):
    with pytest.raises(UserError) as err:
        Generation(program, tokens_for(tiny_params(), prompt_length), Sampler(0.0))
    assert str(err.value) == (f"--prompt: {prompt_length} tokens leave no room to generate in a context of "
                              f"max_seq_length={MAX} tokens")


def test_n_steps_must_be_positive(program):
    with pytest.raises(UserError, match="^--n_steps: expected 1 or more"):
        Generation(program, PROMPT, Sampler(0.0), n_steps=0)
