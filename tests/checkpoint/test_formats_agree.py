"""One tiny Llama written in every source format converts to the same canonical checkpoint, bit for bit."""

import pytest
import sentencepiece

from ane_build.checkpoint import canonical, gguf, hf, meta
from tests.checkpoint.checks import assert_same_weights
from tests.tiny_llama import VARIANTS, tiny_params, tiny_weights, write_gguf, write_hf, write_meta

SAMPLE = "the quick brown fox, jumps! 123 é"


def _write_gguf_f32(params, weights, folder, tied):
    folder.mkdir(parents=True)
    write_gguf(params, weights, folder / "model.gguf", qtype="F32", tied=tied)
    return folder / "model.gguf"


WRITERS = {  # name -> (write the source, read it)
    "hf": (write_hf, hf.read),
    "hf_3_shards": (lambda *a, **kw: write_hf(*a, shards=3, **kw), hf.read),
    "meta": (write_meta, meta.read),
    "gguf_f32": (_write_gguf_f32, gguf.read),
}


def _convert(name, params, weights, tied, tmp_path):
    write, read = WRITERS[name]
    out = tmp_path / "canonical" / name
    out.mkdir(parents=True)
    canonical.write(read(write(params, weights, tmp_path / name, tied=tied)), out)
    return out


def _encode(out):
    tokenizer = out / canonical.read_info(out)["tokenizer"]
    return sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).encode(SAMPLE)


@pytest.mark.parametrize("variant", ["gqa", "llama3_rope", "head_dim_8", "tied"])
def test_all_formats_convert_to_the_same_canonical_checkpoint(tmp_path, variant):
    params = tiny_params(**VARIANTS.get(variant, {}))
    weights = tiny_weights(params)
    tied = variant == "tied"
    if tied:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    outs = {name: _convert(name, params, weights, tied, tmp_path) for name in WRITERS}
    for name, out in outs.items():
        info = canonical.read_info(out)
        assert canonical.read_params(out) == params, name
        assert_same_weights(canonical.read_weights(out), weights)
        assert (info["bos_id"], info["eos_ids"], info["tied_embeddings"]) == (1, [2], tied), name
        # GGUF rebuilds the SentencePiece model from its metadata: other bytes, same tokens.
        assert _encode(out) == _encode(outs["meta"]), name
