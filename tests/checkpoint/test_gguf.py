import functools
import io
import json
import random

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from ane_build.checkpoint import canonical, gguf
from tests.checkpoint.checks import assert_same_weights, one_line_error
from tests.tiny_llama import (
    LLAMA3_ROPE,
    VARIANTS,
    gguf_vocab_from_sentencepiece,
    gguf_vocab_from_tokenizer_json,
    sentencepiece_model,
    tiny_params,
    tiny_weights,
    write_gguf,
)

TEXTS = [
    "Once upon a time, the quick brown fox",
    "  two leading spaces and   three inside  ",
    "line one\nline two\n\n\tindented\r\nend",
    "naïve café, 日本語 and 🚀 emoji",
    "in 2024 we had 1234567 cats, don't we?",
]


@pytest.fixture
def tiny():
    params = tiny_params()
    return params, tiny_weights(params)


# --- weights and params ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reads_canonical_weights_and_params(tmp_path, variant):
    params = tiny_params(**VARIANTS[variant])
    weights = tiny_weights(params)
    written = write_gguf(params, weights, tmp_path / "m.gguf")
    ckpt = gguf.read(tmp_path / "m.gguf")
    assert ckpt.params == params
    assert_same_weights(ckpt.weights, weights)  # F32: exactly the canonical weights, no permutation
    assert_same_weights(written, weights)
    assert (ckpt.tokenizer_name, ckpt.bos_id, ckpt.eos_ids) == ("tokenizer.model", 1, [2])
    assert (ckpt.source_format, ckpt.tied_embeddings) == ("gguf", False)


# Bound on a quantized weight's error relative to the largest magnitude in its block of 32: half a
# step of the float format, or of the block scale, plus Q4_0 / Q5_0's clipping of the far side
# (plus the rounding of a block's scale and minimum to fp16: FP16_SCALES).
QUANT_ERROR = {"F16": 2**-11, "BF16": 2**-8, "Q8_0": 1 / 254, "Q5_1": 1 / 31, "Q5_0": 1 / 16,
               "Q4_1": 1 / 15, "Q4_0": 1 / 8}
FP16_SCALES = 2 * 2**-11


@pytest.mark.parametrize("qtype", sorted(QUANT_ERROR))
def test_quantized_tensors_dequantize_to_what_was_written(tmp_path, tiny, qtype):
    params, weights = tiny
    written = write_gguf(params, weights, tmp_path / "m.gguf", qtype=qtype)
    ckpt = gguf.read(tmp_path / "m.gguf")
    assert_same_weights(ckpt.weights, written)
    for name, tensor in weights.items():
        if tensor.dim() == 1:
            assert torch.equal(ckpt.weights[name], tensor), name  # norms stay F32
            continue
        blocks, got = tensor.reshape(-1, 32), ckpt.weights[name].reshape(-1, 32)
        err = ((got - blocks).abs() / blocks.abs().amax(-1, keepdim=True)).max()
        assert err <= QUANT_ERROR[qtype] + FP16_SCALES, name


# Byte offsets of the fp16 scales in a K-quant block (ggml-common.h); the rest are quant bits.
K_QUANT_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_k_quant(shape, qtype, rng):
    """Random blocks of a K-quant (gguf cannot quantize to these), with small finite scales."""
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        scales = rng.uniform(1e-3, 1e-2, size=(n_blocks, 1)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8)
    return blocks.reshape(shape[0], -1)


@pytest.mark.parametrize("qtype", sorted(K_QUANT_SCALES))
def test_k_quants(tmp_path, qtype):
    params = tiny_params(dim=256, hidden_dim=256, head_dim=64)  # K-quant rows are 256 wide
    weights = tiny_weights(params)
    rng = np.random.default_rng(0)
    raw = {n: (random_k_quant(t.shape, qtype, rng), qtype) for n, t in weights.items() if t.dim() == 2}
    written = write_gguf(params, weights, tmp_path / "m.gguf", raw=raw)
    ckpt = gguf.read(tmp_path / "m.gguf")
    assert ckpt.params == params
    assert_same_weights(ckpt.weights, written)
    assert all(t.isfinite().all() and t.abs().max() > 0 for t in ckpt.weights.values())


# --- quantized blocks, for quantize.linear: source ----------------------------------------------

# GGUF type -> (bits, inputs per scale): every type llama.cpp writes for llama linears is block affine.
BLOCK_TYPES = {"Q8_0": (8, 32), "Q4_0": (4, 32), "Q4_1": (4, 32), "Q5_0": (5, 32), "Q5_1": (5, 32),
               "Q2_K": (2, 16), "Q3_K": (3, 16), "Q4_K": (4, 32), "Q5_K": (5, 32), "Q6_K": (6, 16)}


@pytest.mark.parametrize("qtype", sorted(BLOCK_TYPES))
def test_blocks_read_from_the_bytes_dequantize_to_what_gguf_does(tmp_path, qtype):
    """(qdata - zero) * scale per block, from our own reading of the bytes, is gguf's dequantization
    within the fp32 roundings of the zero point and of gguf's sum. K-quants are random bytes:
    sub-blocks with a zero scale and a nonzero minimum (constant weights) come up too."""
    params = tiny_params(dim=256, hidden_dim=256, head_dim=64)  # K-quant rows are 256 wide
    weights = tiny_weights(params)
    raw = None
    if qtype in K_QUANT_SCALES:
        rng = np.random.default_rng(0)
        raw = {n: (random_k_quant(t.shape, qtype, rng), qtype) for n, t in weights.items() if t.dim() == 2}
    written = write_gguf(params, weights, tmp_path / "m.gguf", qtype=qtype, raw=raw)
    source = gguf.read(tmp_path / "m.gguf").source_blocks
    assert source.refused == {}
    assert sorted(source.blocks) == sorted(n for n, t in weights.items() if t.dim() == 2 and "tok_" not in n)
    bits, block = BLOCK_TYPES[qtype]
    for name, blocks in source.blocks.items():
        assert (blocks.type, blocks.bits, blocks.block) == (qtype, bits, block), name
        assert -(2 ** (bits - 1)) <= blocks.qdata.min().item() and blocks.qdata.max().item() < 2 ** (bits - 1)
        q = blocks.qdata.double().unflatten(1, (-1, block))
        terms = blocks.scale.double()[..., None].abs() * (q.abs() + blocks.zero.double()[..., None].abs())
        want = written[name].double()
        assert ((blocks.dequantize().double() - want).abs() <= 2.0 ** -23 * (want.abs() + terms.flatten(1))).all()


def test_linears_without_blocks_are_named_with_their_type(tmp_path, tiny):
    from gguf import quants

    params, weights = tiny
    raw = {n: (quants.quantize(t.numpy(), GGMLQuantizationType.Q4_1), "Q4_1")
           for n, t in weights.items() if n.startswith("layers.0.") and t.dim() == 2}
    write_gguf(params, weights, tmp_path / "m.gguf", qtype="F16", raw=raw)
    source = gguf.read(tmp_path / "m.gguf").source_blocks
    assert sorted(source.blocks) == sorted(raw)
    linears = [n for n, t in weights.items() if t.dim() == 2 and n != "tok_embeddings.weight"]
    assert source.refused == {n: "F16" for n in linears if n not in raw}


def test_tied_embeddings_give_the_lm_head_the_embeddings_blocks(tmp_path, tiny):
    params, weights = tiny
    write_gguf(params, weights, tmp_path / "m.gguf", qtype="Q8_0", tied=True)
    ckpt = gguf.read(tmp_path / "m.gguf")
    head = ckpt.source_blocks.blocks["output.weight"]
    assert head.type == "Q8_0" and "tok_embeddings.weight" not in ckpt.source_blocks.blocks
    assert torch.allclose(head.dequantize(), ckpt.weights["tok_embeddings.weight"], rtol=2 ** -23, atol=0)


def test_tied_embeddings(tmp_path, tiny):
    params, weights = tiny
    weights["output.weight"] = weights["tok_embeddings.weight"]
    write_gguf(params, weights, tmp_path / "m.gguf", tied=True)
    ckpt = gguf.read(tmp_path / "m.gguf")
    assert ckpt.tied_embeddings
    assert_same_weights(ckpt.weights, weights)
    out = tmp_path / "canonical"
    out.mkdir()
    canonical.write(ckpt, out)
    assert torch.equal(canonical.read_weights(out)["output.weight"], weights["tok_embeddings.weight"])


def test_eos_ids_include_end_of_turn(tmp_path, tiny):
    vocab = gguf_vocab_from_sentencepiece(sentencepiece_model())
    write_gguf(*tiny, tmp_path / "m.gguf", tokenizer={**vocab, "eot_token_id": 5})
    ckpt = gguf.read(tmp_path / "m.gguf")
    assert (ckpt.bos_id, ckpt.eos_ids) == (1, [2, 5])


# --- tokenizers -----------------------------------------------------------------------------------

def corpus():
    rng = random.Random(0)
    words = ("the a quick brown fox jumps over lazy dog cat naïve café 日本語 🚀 don't we're "
             "2024 1234567 42 line tab").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    return lines + TEXTS


@functools.lru_cache(maxsize=None)
def llama_like_sentencepiece():
    """A SentencePiece model trained the way Llama's was: BPE, byte fallback, no normalization."""
    import sentencepiece

    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=out, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=["<tool>"],
        num_threads=1, minloglevel=2)
    return out.getvalue()


def test_sentencepiece_vocabulary_becomes_an_equivalent_tokenizer_model(tmp_path):
    import sentencepiece
    from pytorch_tokenizers import CppSPTokenizer

    params = tiny_params(vocab_size=512)
    original = sentencepiece.SentencePieceProcessor(model_proto=llama_like_sentencepiece())
    vocab = gguf_vocab_from_sentencepiece(llama_like_sentencepiece())
    write_gguf(params, tiny_weights(params), tmp_path / "m.gguf", tokenizer=vocab)
    ckpt = gguf.read(tmp_path / "m.gguf")
    assert ckpt.tokenizer_name == "tokenizer.model"
    assert (ckpt.bos_id, ckpt.eos_ids) == (original.bos_id(), [original.eos_id()])
    (tmp_path / "tokenizer.model").write_bytes(ckpt.tokenizer_bytes)
    rebuilt = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    cpp = CppSPTokenizer()
    cpp.load(str(tmp_path / "tokenizer.model"))
    for text in TEXTS + ["call <tool> now"]:
        ids = original.encode(text)
        assert rebuilt.encode(text) == ids, text
        assert cpp.encode(text, 0, 0) == ids, text
        assert rebuilt.decode(ids) == text


# The pre-tokenizers of the models' own tokenizer.json files (GPT-2, SmolLM2, Llama 3), by tokenizer.ggml.pre.
GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
ORIGINAL_PRE_TOKENIZERS = {
    "gpt2": GPT2_SPLIT,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     GPT2_SPLIT]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.lru_cache(maxsize=None)
def trained_byte_level_bpe():
    """tokenizer.json of a byte-level BPE trained with GPT-2's split (so it has digit merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens(["<think>"])  # a user-defined (not special) added token
    return tok.to_str()


def original_tokenizer(pre):
    """The trained vocabulary and merges, splitting text the way model family ``pre`` does."""
    from tokenizers import Tokenizer

    spec = json.loads(trained_byte_level_bpe())
    spec["pre_tokenizer"] = ORIGINAL_PRE_TOKENIZERS[pre]
    spec["model"]["ignore_merges"] = pre == "llama-bpe"
    return Tokenizer.from_str(json.dumps(spec))


def test_pre_tokenizers_make_a_difference():
    """Guards the test below: the vocabulary is one on which the three splits disagree."""
    text = "in 2024 we had 1234567 cats"
    assert len({tuple(original_tokenizer(pre).encode(text).ids) for pre in ORIGINAL_PRE_TOKENIZERS}) == 3


@pytest.mark.parametrize("pre", sorted(ORIGINAL_PRE_TOKENIZERS))
def test_byte_level_vocabulary_becomes_an_equivalent_tokenizer_json(tmp_path, pre):
    from pytorch_tokenizers import CppHFTokenizer, HuggingFaceTokenizer
    from tokenizers import Tokenizer

    params = tiny_params(vocab_size=512)
    original = original_tokenizer(pre)
    vocab = gguf_vocab_from_tokenizer_json(original.to_str(), pre=pre, bos="<|im_start|>", eos="<|im_end|>")
    write_gguf(params, tiny_weights(params), tmp_path / "m.gguf", tokenizer=vocab)
    ckpt = gguf.read(tmp_path / "m.gguf")
    assert ckpt.tokenizer_name == "tokenizer.json"
    assert (ckpt.bos_id, ckpt.eos_ids) == (1, [2])
    path = tmp_path / "tokenizer.json"
    path.write_bytes(ckpt.tokenizer_bytes)
    rebuilt = Tokenizer.from_file(str(path))
    cpp = CppHFTokenizer()
    cpp.load(str(path))
    python = HuggingFaceTokenizer(str(path))
    for text in TEXTS + ["<|im_start|>user\nhi <think>ok</think><|im_end|>"]:
        ids = original.encode(text).ids
        assert rebuilt.encode(text).ids == ids, text
        assert cpp.encode(text, 0, 0) == ids, text
        assert python.encode(text, bos=False, eos=False) == ids, text
        assert rebuilt.decode(ids, skip_special_tokens=False) == text
    assert rebuilt.decode(rebuilt.encode("<|im_end|>x").ids) == "x"  # control tokens are special


# --- bad input: one line naming the file ----------------------------------------------------------

def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _set_tensor_type(path, tensor, type_id):
    reader = GGUFReader(path, "r+")
    field = next(t.field for t in reader.tensors if t.name == tensor)
    field.parts[4][0] = type_id  # name_len, name, n_dims, dims, type, offset
    reader.data.flush()


def _bad_file(tmp_path, case):
    """Write the tiny model, spoiled as ``case`` says; return its path."""
    params = tiny_params()
    weights = tiny_weights(params)
    path = tmp_path / "bad.gguf"
    kwargs = {}
    if case == "missing tensor":
        del weights["layers.1.attention.wk.weight"]
    elif case == "extra layer":
        weights = tiny_weights(tiny_params(n_layers=3))
    elif case == "not llama":
        kwargs["arch"] = "qwen2"
    elif case == "rope_freqs of another scaling":
        params = tiny_params(**{**LLAMA3_ROPE, "high_freq_factor": 2.0})
        weights = tiny_weights(params)
    elif case == "linear rope scaling":
        kwargs["metadata"] = {"llama.rope.scaling.type": "linear"}
    elif case == "unknown pre-tokenizer":
        kwargs["tokenizer"] = gguf_vocab_from_tokenizer_json(trained_byte_level_bpe(), pre="qwen2",
                                                             bos="<|im_start|>", eos="<|im_end|>")
    elif case == "no tokenizer":
        kwargs["tokenizer"] = None
    write_gguf(params, weights, path, **kwargs)
    if case == "truncated data":
        _truncate(path, path.stat().st_size - 100)
    elif case == "truncated header":
        _truncate(path, 40)
    elif case == "empty":
        _truncate(path, 0)
    elif case == "unsupported type":
        _set_tensor_type(path, "blk.0.attn_q.weight", GGMLQuantizationType.I32)  # same size as F32
    elif case == "unknown type":
        _set_tensor_type(path, "blk.0.attn_q.weight", 200)
    return path


BAD_INPUTS = {  # case -> what the message must say
    "truncated data": "truncated",
    "truncated header": "truncated",
    "empty": "truncated",
    "not llama": "'qwen2'",
    "missing tensor": "blk.1.attn_k.weight is missing",
    "extra layer": "unexpected tensor blk.2.",
    "unsupported type": "blk.0.attn_q.weight has type I32",
    "unknown type": "200",
    "linear rope scaling": "'linear'",
    "rope_freqs of another scaling": "rope_freqs.weight is not Llama 3 rope scaling",
    "unknown pre-tokenizer": "'qwen2'",
    "no tokenizer": "tokenizer.ggml.tokens",
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file(tmp_path, case):
    path = _bad_file(tmp_path, case)
    message = one_line_error(gguf.read, path)
    assert message.startswith(f"{path}: ") and BAD_INPUTS[case] in message, message


def test_missing_file(tmp_path):
    message = one_line_error(gguf.read, tmp_path / "absent.gguf")
    assert message.startswith(f"{tmp_path / 'absent.gguf'}: ")


# --- the real model -------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_decodes_exactly_like_transformers_reading_the_same_gguf(smollm2_gguf, smollm2_checkpoint):
    from pytorch_tokenizers import CppHFTokenizer
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ane_build.model.reference import ReferenceLlama

    path, folder = smollm2_gguf, smollm2_checkpoint
    assert canonical.read_info(folder)["tied_embeddings"] and canonical.read_params(folder)["n_layers"] == 30
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    cpp = CppHFTokenizer()
    cpp.load(str(folder / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS + ["<|im_start|>user\nHi!<|im_end|>\n"]:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text).ids == ids, text
        assert cpp.encode(text, 0, 0) == ids, text

    prompt = ours.encode("Once upon a time,").ids
    generated = ReferenceLlama.from_checkpoint(folder).greedy(prompt, 32)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert generated == expected
