"""Rebuild a tokenizer file from the vocabulary a GGUF file keeps in its metadata.

A GGUF carries no tokenizer file, only llama.cpp's description of one (``tokenizer.ggml.*``):

- model ``gpt2``: byte-level BPE (tokens spelled in GPT-2's byte alphabet, plus merges) becomes a
  Hugging Face ``tokenizer.json``. The text is split before BPE the way llama.cpp splits it for
  ``tokenizer.ggml.pre``, since the merges were learned on text split that way.
- model ``llama``: a SentencePiece vocabulary (pieces, scores, types) becomes ``tokenizer.model``.
"""

import logging

import sentencepiece
from gguf import TokenType
from sentencepiece import sentencepiece_model_pb2 as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from ane_build.util.errors import UserError

log = logging.getLogger(__name__)

TOKENS = "tokenizer.ggml.tokens"
# Per-token arrays that must line up with TOKENS.
_PER_TOKEN = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")
# SentencePiece's special pieces and the GGUF keys naming them.
_SPM_SPECIALS = (("unk", "unknown_token_id"), ("bos", "bos_token_id"), ("eos", "eos_token_id"),
                 ("pad", "padding_token_id"))

# Llama 3's split, as its tokenizer.json writes it (llama.cpp uses an equivalent spelling).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split():
    # ByteLevel's own regex is GPT-2's: 's|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split():
    # llama.cpp's "smollm" family: every digit on its own, then GPT-2's regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _llama3_split():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


# tokenizer.ggml.pre -> the pre-tokenizer matching llama.cpp's split for it (llama-vocab.cpp).
PRE_TOKENIZERS = {
    "gpt2": _gpt2_split,
    "smollm": _digits_then_gpt2_split,
    "starcoder": _digits_then_gpt2_split,
    "llama-bpe": _llama3_split,
    "llama3": _llama3_split,
    "llama-v3": _llama3_split,
}
# Llama 3 takes a word that is itself a token as is, before trying merges (HF and llama.cpp alike).
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}


def build(meta, where):
    """(file name, bytes) of the tokenizer described by GGUF metadata ``meta``."""
    kind = meta.get("tokenizer.ggml.model")
    if TOKENS not in meta:
        raise UserError(where, f"metadata has no {TOKENS}: expected the vocabulary llama.cpp writes")
    for key in _PER_TOKEN:
        if key in meta and len(meta[key]) != len(meta[TOKENS]):
            raise UserError(where, f"{key} has {len(meta[key])} entries for {len(meta[TOKENS])} tokens")
    if kind == "gpt2":
        return "tokenizer.json", _byte_level_bpe(meta, where)
    if kind == "llama":
        return "tokenizer.model", _sentencepiece(meta, where)
    raise UserError(where, f"tokenizer.ggml.model is {kind!r}; expected 'gpt2' (byte-level BPE) "
                           "or 'llama' (SentencePiece)")


def special_ids(meta, where):
    """The bos id and the ids that end generation (eos, then end-of-turn / end-of-message if set)."""
    eos = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        token_id = _token_id(meta, key, where)
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    return _token_id(meta, "bos_token_id", where), eos


def _token_id(meta, key, where):
    token_id = meta.get(f"tokenizer.ggml.{key}")
    if token_id is not None and not 0 <= token_id < len(meta[TOKENS]):
        raise UserError(where, f"tokenizer.ggml.{key} is {token_id}, outside the vocabulary "
                               f"of {len(meta[TOKENS])} tokens")
    return token_id


def _byte_level_bpe(meta, where):
    if "tokenizer.ggml.merges" not in meta:
        raise UserError(where, "metadata has no tokenizer.ggml.merges; a 'gpt2' tokenizer needs them")
    pre = _pre_tokenizer_name(meta, where)
    tokens = meta[TOKENS]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                     ignore_merges=pre in _IGNORE_MERGES)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # llama.cpp matches control and user-defined tokens whole in the raw text; HF does that for
    # added tokens, and only control ones are special (dropped by skip_special_tokens).
    types = meta.get("tokenizer.ggml.token_type") or []
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, types) if kind == TokenType.CONTROL]
    user_defined = [AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types) if kind == TokenType.USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user_defined)
    log.debug("rebuilt tokenizer.json: %d tokens, %d merges, pre-tokenizer %s, %d added tokens",
              len(tokens), len(merges), pre, len(control) + len(user_defined))
    return tok.to_str().encode()


def _pre_tokenizer_name(meta, where):
    pre = meta.get("tokenizer.ggml.pre")
    if pre is None:
        # What llama.cpp does too (with a warning) for files written before the key existed.
        log.warning("%s: no tokenizer.ggml.pre; splitting text with GPT-2's regex", where)
        return "gpt2"
    if pre not in PRE_TOKENIZERS:
        raise UserError(where, f"tokenizer.ggml.pre is {pre!r}, a pre-tokenizer this reader does not know; "
                               f"known: {', '.join(sorted(PRE_TOKENIZERS))}")
    return pre


def _sentencepiece(meta, where):
    tokens = meta[TOKENS]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    proto = spm.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        # GGUF's token types are SentencePiece's piece types, number for number.
        proto.pieces.add(piece=piece, score=score, type=kind)
    _trainer_spec(proto.trainer_spec, meta, types, where)
    norm = proto.normalizer_spec
    # GGUF keeps no normalizer and llama.cpp applies none but the dummy prefix space.
    norm.name = "identity"
    norm.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    data = proto.SerializeToString()
    try:
        sentencepiece.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:
        raise UserError(where, f"its SentencePiece vocabulary does not make a valid tokenizer.model "
                               f"({' '.join(str(e).split())})") from None
    log.debug("rebuilt tokenizer.model: %d pieces", len(tokens))
    return data


def _trainer_spec(spec, meta, types, where):
    # llama.cpp tokenizes every 'llama' vocabulary by merging the best-scored pair first,
    # which is SentencePiece's BPE.
    spec.model_type = spm.TrainerSpec.BPE
    spec.vocab_size = len(types)
    spec.byte_fallback = TokenType.BYTE in types
    # SentencePiece finds its special ids by piece name.
    for name, key in _SPM_SPECIALS:
        token_id = _token_id(meta, key, where)
        if token_id is not None:
            setattr(spec, f"{name}_id", token_id)
            setattr(spec, f"{name}_piece", meta[TOKENS][token_id])
