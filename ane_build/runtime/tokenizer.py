"""Tokenizer files through pytorch-tokenizers, and text streamed token by token.

``tokenizer_files.load`` tells the kind and proves the file loads in the C++ classes the
device runners use. Encoding and decoding go through pytorch-tokenizers' Python classes
over the same files (same ids, checked in the tests): the C++ ``decode`` takes one token
and fails on a token that is only part of a UTF-8 character, and streaming needs to decode
a run of ids.
"""

import logging
import re

from ane_build.checkpoint import tokenizer_files
from ane_build.checkpoint.tokenizer_files import HF_JSON, SENTENCEPIECE, TIKTOKEN
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
REPLACEMENT = "\ufffd"  # what a decoder makes of bytes that are not (yet) a whole UTF-8 character


class Tokenizer:
    def __init__(self, path):
        import pytorch_tokenizers

        found = tokenizer_files.load(path)
        self.path, self.kind = found.path, found.kind
        self.bos_id, self.eos_ids = found.bos_id, tuple(found.eos_ids)
        make = {SENTENCEPIECE: pytorch_tokenizers.Llama2cTokenizer, TIKTOKEN: pytorch_tokenizers.TiktokenTokenizer,
                HF_JSON: pytorch_tokenizers.HuggingFaceTokenizer}[self.kind]
        self._impl = make(str(self.path))
        self.vocab_size = self._impl.n_words
        log.info("tokenizer %s: %s, %d tokens", self.path.name, self.kind, self.vocab_size)

    def encode(self, text, bos_id=None):
        """Ids of ``text``, after ``bos_id`` when given; a tokenizer.json's own post-processor
        decides for itself (it adds bos where the model wants it), so bos_id is not added there."""
        ids = self._impl.encode(text, bos=False, eos=False)
        if bos_id is not None and self.kind != HF_JSON:
            ids.insert(0, bos_id)
        return ids

    def prompt_ids(self, text, info):
        """``text``'s ids for the program ``info`` describes: the checkpoint's word on bos (the
        program's) comes first; the tokenizer's own fills in."""
        return self.encode(text, self.bos_id if info.bos_id is None else info.bos_id)

    def stop_ids(self, info):
        """The ids that end a generation: the program's eos ids, else the tokenizer's."""
        return info.eos_ids or self.eos_ids

    def chat_ids(self, text):
        """Ids of a rendered chat template: the special tokens written in it become their ids and
        nothing is added, bos included (the template writes it where the model wants it), as
        transformers encodes a chat with ``add_special_tokens=False``."""
        if self.kind == HF_JSON:
            return self._impl.model.encode(text, add_special_tokens=False).ids
        if self.kind == TIKTOKEN:
            return self._impl.encode(text, bos=False, eos=False, allowed_special="all")
        # SentencePiece reads "<s>" as three characters: cut the text at its control pieces.
        specials = self.special_tokens()
        if not specials:
            return self.encode(text)
        ids = []
        for i, part in enumerate(re.split(f"({'|'.join(map(re.escape, sorted(specials, key=len, reverse=True)))})",
                                          text)):
            ids += [specials[part]] if i % 2 else (self.encode(part) if part else [])
        return ids

    def special_tokens(self):
        """{text: id} of the tokens a text names only by their spelling (control tokens, not words)."""
        if self.kind == HF_JSON:
            return {t.content: i for i, t in self._impl.model.get_added_tokens_decoder().items() if t.special}
        if self.kind == TIKTOKEN:
            return dict(self._impl.special_tokens)
        sp = self._impl.sp_model
        return {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}

    def token(self, token_id):
        """The text of one token as it is written, special tokens included ("<|im_end|>")."""
        if self.kind == HF_JSON:
            return self._impl.model.id_to_token(token_id)
        if self.kind == TIKTOKEN:
            return self._impl.decode_token(token_id)
        return self._impl.sp_model.id_to_piece(token_id)

    def decode(self, ids):
        return self._impl.decode(list(ids))

    def check_fits(self, vocab_size, model, where=None):
        """Refuse a tokenizer whose ids go past the model's embedding (a smaller one is fine: models pad).
        The error names ``where`` the tokenizer came from (default: its file)."""
        if self.vocab_size > vocab_size:
            raise UserError(where or str(self.path), f"{self.vocab_size} tokens, more than {model}'s vocab_size "
                                                     f"{vocab_size}: not this model's tokenizer")


class TextStream:
    """The text of a growing id list, piece by piece; the pieces join up to ``decode(all ids)``.

    Each new piece is the decode of the last few ids minus the decode of those before the
    new ones, as Hugging Face's and vLLM's incremental detokenizers do: decoding one token
    alone would drop a SentencePiece token's leading space and split multi-byte characters.
    While the text ends in an incomplete UTF-8 character (a replacement character), it is
    held back until the bytes that complete it arrive, or until ``flush``.
    """

    def __init__(self, tokenizer, context=()):
        """``context``: ids already shown (the prompt), so the first piece joins onto them."""
        self.tokenizer = tokenizer
        self.ids = list(context)
        self._read = len(self.ids)  # ids whose text has been given out
        # Decoding starts a token early, so a first new token keeps its leading space.
        self._start = max(self._read - 1, 0)

    def push(self, token):
        """The text ``token`` adds (may be empty while a character is incomplete)."""
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self):
        """Whatever is held back, at the end of generation."""
        return self._emit(final=True)

    def _emit(self, final):
        if len(self.ids) == self._read:
            return ""
        shown = self.tokenizer.decode(self.ids[self._start:self._read])
        text = self.tokenizer.decode(self.ids[self._start:])
        if text.endswith(REPLACEMENT) and not final:
            return ""
        self._start, self._read = self._read, len(self.ids)
        return text[len(shown):]
