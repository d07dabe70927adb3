import json

import pytest
import torch

from ane_build.checkpoint import meta
from tests.checkpoint.checks import assert_same_weights, one_line_error
from tests.tiny_llama import VARIANTS, tiny_params, tiny_weights, write_meta


@pytest.fixture
def tiny():
    params = tiny_params()
    return params, tiny_weights(params)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reads_canonical_weights_and_params(tmp_path, variant):
    params = tiny_params(**VARIANTS[variant])
    weights = tiny_weights(params)
    ckpt = meta.read(write_meta(params, weights, tmp_path))
    assert ckpt.params == params
    assert_same_weights(ckpt.weights, weights)
    assert (ckpt.source_format, ckpt.tied_embeddings) == ("meta", False)


def test_checkpoint_without_output_weight_is_tied(tmp_path, tiny):
    params, weights = tiny
    weights["output.weight"] = weights["tok_embeddings.weight"]
    ckpt = meta.read(write_meta(params, weights, tmp_path, tied=True))
    assert ckpt.tied_embeddings
    assert_same_weights(ckpt.weights, weights)


def test_llama2_params_json(tmp_path):
    """Llama 2's params.json: vocab_size -1, no n_kv_heads / rope_theta / use_scaled_rope; a rope.freqs buffer."""
    params = tiny_params(n_kv_heads=4)
    weights = tiny_weights(params)
    folder = write_meta(params, weights, tmp_path)
    raw = json.loads((folder / "params.json").read_text())
    for key in ("n_kv_heads", "rope_theta", "use_scaled_rope"):
        del raw[key]
    (folder / "params.json").write_text(json.dumps({**raw, "vocab_size": -1}))
    torch.save({**weights, "rope.freqs": torch.ones(8)}, folder / "consolidated.00.pth")
    ckpt = meta.read(folder)
    assert ckpt.params == params
    assert_same_weights(ckpt.weights, weights)


@pytest.mark.parametrize("dim, multiple_of, ffn_dim_multiplier", [
    (4096, 1024, 1.3),  # Llama 3 8B
    (2048, 256, 1.5),  # Llama 3.2 1B
    (3072, 256, 1.0),  # Llama 3.2 3B
    (4096, 256, None),  # Llama 2 7B
    (64, 32, None),
])
def test_ffn_hidden_dim_as_executorch_derives_it(dim, multiple_of, ffn_dim_multiplier):
    model_args = pytest.importorskip("executorch.examples.models.llama.model_args")
    args = model_args.ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier)
    assert meta.ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier) == args.hidden_dim


def test_sentencepiece_special_ids(tmp_path, tiny):
    import sentencepiece

    folder = write_meta(*tiny, tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ckpt = meta.read(folder)
    assert (ckpt.bos_id, ckpt.eos_ids) == (sp.bos_id(), [sp.eos_id()])


def test_tiktoken_special_ids_as_pytorch_tokenizers_reports_them(tmp_path, tiny):
    from pytorch_tokenizers import TiktokenTokenizer

    folder = write_meta(*tiny, tmp_path, tokenizer="tiktoken")
    special = TiktokenTokenizer(str(folder / "tokenizer.model")).special_tokens
    ckpt = meta.read(folder)
    assert ckpt.bos_id == special["<|begin_of_text|>"]
    assert ckpt.eos_ids == [special[t] for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")]
    assert ckpt.tokenizer_bytes == (folder / "tokenizer.model").read_bytes()


FLAG = []


def _side_effect():
    FLAG.append("unpickled")


class _Trap:
    def __reduce__(self):
        return _side_effect, ()


def test_pickled_object_is_refused_not_run(tmp_path, tiny):
    folder = write_meta(*tiny, tmp_path)
    torch.save({**tiny[1], "trap": _Trap()}, folder / "consolidated.00.pth")
    message = one_line_error(meta.read, folder)
    assert "consolidated.00.pth: refused" in message and "_side_effect" in message
    assert FLAG == []


def test_garbage_pth(tmp_path, tiny):
    folder = write_meta(*tiny, tmp_path)
    (folder / "consolidated.00.pth").write_bytes(b"garbage" * 20)
    assert "consolidated.00.pth: not a PyTorch weights file" in one_line_error(meta.read, folder)


def test_params_inconsistent_with_weights(tmp_path, tiny):
    message = one_line_error(meta.read, write_meta(*tiny, tmp_path, params_json={"n_kv_heads": 4}))
    assert message.endswith("params.json: weight layers.0.attention.wk.weight has shape [32, 64], "
                            "params.json implies [64, 64]")


def test_missing_weights_file(tmp_path, tiny):
    folder = write_meta(*tiny, tmp_path)
    (folder / "consolidated.00.pth").unlink()
    assert "consolidated.00.pth: missing" in one_line_error(meta.read, folder)


def test_model_parallel_shards_refused(tmp_path, tiny):
    folder = write_meta(*tiny, tmp_path)
    (folder / "consolidated.01.pth").write_bytes((folder / "consolidated.00.pth").read_bytes())
    assert "2 model-parallel shards" in one_line_error(meta.read, folder)


def test_scaled_rope_without_factor_refused(tmp_path, tiny):
    message = one_line_error(meta.read, write_meta(*tiny, tmp_path, params_json={"use_scaled_rope": True}))
    assert "params.json" in message and "rope_scale_factor" in message


@pytest.mark.parametrize("kind, content", [("sentencepiece", b"\x08\x01garbage"), ("tiktoken", b"YQ== 0\nYg== x\n")])
def test_unreadable_tokenizer(tmp_path, tiny, kind, content):
    folder = write_meta(*tiny, tmp_path, tokenizer=kind)
    (folder / "tokenizer.model").write_bytes(content)
    message = one_line_error(meta.read, folder)
    assert "tokenizer.model: not " in message and "pytorch-tokenizers" in message


def test_missing_tokenizer(tmp_path, tiny):
    message = one_line_error(meta.read, write_meta(*tiny, tmp_path, tokenizer=None))
    assert "no tokenizer file" in message and "tokenizer.model" in message
