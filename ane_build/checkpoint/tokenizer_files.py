"""A checkpoint's tokenizer file: find it, prove pytorch-tokenizers can load it, read its special ids.

Loading goes through pytorch-tokenizers' C++ classes because they are what ExecuTorch's
runners use on device: a tokenizer that only loads in Python would fail there.
"""

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ane_build.util.errors import UserError

log = logging.getLogger(__name__)

SENTENCEPIECE, TIKTOKEN, HF_JSON = "sentencepiece", "tiktoken", "huggingface"
# Llama 3 ends a text, a turn and a tool message with different tokens; a runner must stop on all.
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=* \d+\r?$")


@dataclass
class TokenizerFile:
    path: Path
    kind: str  # SENTENCEPIECE, TIKTOKEN or HF_JSON
    bos_id: int | None = None  # as the tokenizer itself reports them (None for tokenizer.json)
    eos_ids: list = field(default_factory=list)


def find(folder, preference):
    """The first of ``preference`` (file names) present in ``folder``."""
    for name in preference:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise UserError(str(folder), f"no tokenizer file: expected one of {', '.join(preference)}")


def load(path):
    """Verify ``path`` loads with pytorch-tokenizers and return what it is, with its special ids."""
    path = Path(path)
    if path.name == "tokenizer.json":
        _load_cpp(path, "CppHFTokenizer", "a Hugging Face tokenizer.json")
        return TokenizerFile(path, HF_JSON)
    if _looks_like_tiktoken(path):
        return _load_tiktoken(path)
    return _load_sentencepiece(path)


def _looks_like_tiktoken(path):
    # tiktoken BPE files are text lines "<base64 token> <rank>"; SentencePiece models are protobuf.
    with open(path, "rb") as f:
        first = f.readline(4096).rstrip(b"\n")
    return bool(_TIKTOKEN_LINE.match(first))


def _load_sentencepiece(path):
    tok = _load_cpp(path, "CppSPTokenizer", "a SentencePiece model or a tiktoken BPE file")
    # SentencePiece reports -1 for a model trained without bos / eos.
    bos, eos = tok.bos_tok(), tok.eos_tok()
    return TokenizerFile(path, SENTENCEPIECE, bos if bos >= 0 else None, [eos] if eos >= 0 else [])


def _load_tiktoken(path):
    tok = _load_cpp(path, "CppTiktoken", "a tiktoken BPE file (Llama 3 special tokens)")
    eos = [_special_id(tok, path, name) for name in LLAMA3_EOS]
    return TokenizerFile(path, TIKTOKEN, _special_id(tok, path, LLAMA3_BOS), eos)


def _special_id(tok, path, name):
    ids = tok.encode(name, 0, 0)
    if len(ids) != 1:
        raise UserError(str(path), f"special token {name} does not encode to one id (got {ids})")
    return ids[0]


def _load_cpp(path, cls_name, what):
    import pytorch_tokenizers

    tok = getattr(pytorch_tokenizers, cls_name)()
    try:
        tok.load(str(path))
    except RuntimeError as e:
        raise UserError(str(path), f"not {what} that pytorch-tokenizers can load ({e})") from None
    log.debug("%s loads as %s, vocab %d", path.name, cls_name, tok.vocab_size())
    return tok
