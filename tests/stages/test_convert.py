import pytest

from ane_build.stages import convert
from ane_build.util.errors import UserError
from tests.tiny_llama import tiny_params, tiny_weights, write_hf, write_meta

WRITERS = {"hf": write_hf, "meta": write_meta}


def fetch_entry(tmp_path, fmt, params):
    """A fetch entry holding a tiny checkpoint folder in ``fmt`` with the 320-token SentencePiece tokenizer."""
    folder = tmp_path / "fetch" / "source" / "model"
    folder.mkdir(parents=True)
    WRITERS[fmt](params, tiny_weights(params), folder)
    return tmp_path / "fetch"


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_a_matching_tokenizer_converts(tmp_path, fmt):
    out = tmp_path / "convert"
    out.mkdir()
    metrics = convert.run({"fetch": fetch_entry(tmp_path, fmt, tiny_params())}, {"format": "auto"}, out)
    assert metrics["format"] == fmt and (out / "tokenizer.model").is_file()


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, fmt):
    fetch = fetch_entry(tmp_path, fmt, tiny_params(vocab_size=256))
    out = tmp_path / "convert"
    out.mkdir()
    with pytest.raises(UserError) as error:
        convert.run({"fetch": fetch}, {"format": "auto"}, out)
    assert str(error.value) == (f"{fetch / 'source' / 'model'} (tokenizer.model): 320 tokens, more than the "
                                "checkpoint's vocab_size 256: not this model's tokenizer")
