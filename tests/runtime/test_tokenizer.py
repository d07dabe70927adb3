import pytest

from ane_build.runtime.tokenizer import REPLACEMENT, TextStream, Tokenizer
from ane_build.util.errors import UserError
from tests.tiny_llama import TOKENIZERS, write_tokenizer

KINDS = list(TOKENIZERS)  # sentencepiece, tiktoken, tokenizer.json
TEXT = "héllo 世界 👋 the quick cat"  # 2-, 3- and 4-byte characters, spaces that start tokens


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    def make(kind):
        folder = tmp_path_factory.mktemp(kind.replace(".", "_"))
        return Tokenizer(write_tokenizer(folder, kind))
    return {kind: make(kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_ids_are_the_cpp_tokenizers_ids(tokenizers, kind):
    """The device runners encode with pytorch-tokenizers' C++ classes: the prompt must be the same ids."""
    import pytorch_tokenizers

    tok = tokenizers[kind]
    cpp = {"sentencepiece": "CppSPTokenizer", "tiktoken": "CppTiktoken", "tokenizer.json": "CppHFTokenizer"}[kind]
    reference = getattr(pytorch_tokenizers, cpp)()
    reference.load(str(tok.path))
    assert tok.encode(TEXT) == reference.encode(TEXT, 0, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_text_is_the_decoded_text(tokenizers, kind):
    tok = tokenizers[kind]
    ids = tok.encode(TEXT)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any(REPLACEMENT in p for p in pieces)  # a split character waits for its last byte
    assert "" in pieces[:-1]  # (and this text does split some)


@pytest.mark.parametrize("kind", KINDS)
def test_streamed_text_joins_onto_the_prompt(tokenizers, kind):
    tok = tokenizers[kind]
    prompt, ids = tok.encode("the cat", bos_id=tok.bos_id), tok.encode(" " + TEXT)
    stream = TextStream(tok, context=prompt)
    streamed = "".join([stream.push(i) for i in ids] + [stream.flush()])
    assert tok.decode(prompt) + streamed == tok.decode(prompt + ids)
    assert streamed.startswith(" héllo")  # a token's leading space survives at the start of the stream


def test_an_incomplete_character_at_the_end_is_flushed(tokenizers):
    tok = tokenizers["tokenizer.json"]
    ids = tok.encode("é")
    assert len(ids) == 2  # one byte per token in this small vocabulary
    stream = TextStream(tok)
    assert stream.push(ids[0]) == ""
    assert stream.flush() == REPLACEMENT


def test_bos_is_added_unless_a_tokenizer_json_decides(tokenizers):
    assert tokenizers["sentencepiece"].encode("the cat", bos_id=1)[0] == 1
    assert tokenizers["tiktoken"].encode("the cat", bos_id=7)[0] == 7
    hf = tokenizers["tokenizer.json"]
    assert hf.encode("the cat", bos_id=1) == hf.encode("the cat")


def test_special_ids_come_from_the_tokenizer(tokenizers):
    sp, tiktoken = tokenizers["sentencepiece"], tokenizers["tiktoken"]
    assert (sp.bos_id, sp.eos_ids) == (1, (2,))
    assert tiktoken.vocab_size == 262 + 256 and tiktoken.bos_id == 262  # Llama 3's 256 special tokens follow


def test_a_tokenizer_larger_than_the_model_is_refused(tokenizers):
    tokenizers["tokenizer.json"].check_fits(320, "twin.pte")  # 300 ids into a padded embedding: fine
    with pytest.raises(UserError) as err:
        tokenizers["tiktoken"].check_fits(320, "twin.pte")
    message = str(err.value)
    assert message.endswith("518 tokens, more than twin.pte's vocab_size 320: not this model's tokenizer")
    assert "tokenizer.model: " in message and "\n" not in message
