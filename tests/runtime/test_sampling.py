from collections import Counter

import pytest
import torch

from ane_build.runtime.sampling import Sampler
from ane_build.util.errors import UserError


def random_logits(n=8, vocab=320):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax():
    sampler = Sampler(temperature=0.0)
    assert [sampler(row) for row in random_logits()] == random_logits().argmax(-1).tolist()


def test_the_same_seed_gives_the_same_tokens():
    runs = [[Sampler(1.0, 0.9, seed=s)(row) for row in random_logits()] for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_a_small_top_p_is_greedy():
    sampler = Sampler(temperature=1.0, top_p=1e-6, seed=0)
    assert [sampler(row) for row in random_logits()] == random_logits().argmax(-1).tolist()


def frequencies(sampler, probs, n=20000):
    logits = torch.tensor(probs).log()
    counts = Counter(sampler(logits) for _ in range(n))
    return [counts[i] / n for i in range(len(probs))]


def test_temperature_one_samples_the_distribution():
    got = frequencies(Sampler(1.0, 1.0, seed=0), [0.5, 0.3, 0.2])
    assert got == pytest.approx([0.5, 0.3, 0.2], abs=0.02)


def test_temperature_sharpens_and_flattens():
    assert frequencies(Sampler(0.1, 1.0, seed=0), [0.5, 0.3, 0.2], 2000)[0] > 0.99
    assert frequencies(Sampler(100.0, 1.0, seed=0), [0.5, 0.3, 0.2]) == pytest.approx([1 / 3] * 3, abs=0.02)


def test_top_p_keeps_the_smallest_set_that_reaches_it():
    got = frequencies(Sampler(1.0, 0.75, seed=0), [0.5, 0.3, 0.2])
    assert got[2] == 0 and got[0] == pytest.approx(0.5 / 0.8, abs=0.02)


@pytest.mark.parametrize("flag, kwargs", [("--top_p", {"top_p": 0.0}), ("--top_p", {"top_p": 1.5}),
                                          ("--temperature", {"temperature": -1.0})])
def test_out_of_range_flags_are_user_errors(flag, kwargs):
    with pytest.raises(UserError) as err:
        Sampler(**{"temperature": 0.6, "top_p": 0.9, **kwargs})
    assert str(err.value).startswith(f"{flag}: expected") and "\n" not in str(err.value)


def test_a_wide_nucleus_is_sampled_whole():
    """A flat distribution's nucleus is most of the vocabulary, far past the first tokens looked at."""
    sampler = Sampler(1.0, 0.99, seed=0)
    assert len({sampler(torch.zeros(4096)) for _ in range(3000)}) > 2000
