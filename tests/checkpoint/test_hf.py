import json

import pytest

from ane_build.checkpoint import hf
from tests.checkpoint.checks import assert_same_weights, one_line_error
from tests.tiny_llama import LLAMA3_ROPE, VARIANTS, hf_config, tiny_params, tiny_weights, write_hf, write_tokenizer


@pytest.fixture
def tiny():
    params = tiny_params()
    return params, tiny_weights(params)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reads_canonical_weights_and_params(tmp_path, variant, shards):
    params = tiny_params(**VARIANTS[variant])
    weights = tiny_weights(params)
    ckpt = hf.read(write_hf(params, weights, tmp_path, shards=shards))
    assert ckpt.params == params
    assert_same_weights(ckpt.weights, weights)
    assert (ckpt.tokenizer_name, ckpt.bos_id, ckpt.eos_ids) == ("tokenizer.model", 1, [2])
    assert (ckpt.source_format, ckpt.tied_embeddings) == ("hf", False)


def test_tied_embeddings(tmp_path, tiny):
    params, weights = tiny
    weights["output.weight"] = weights["tok_embeddings.weight"]
    ckpt = hf.read(write_hf(params, weights, tmp_path, tied=True))
    assert ckpt.tied_embeddings
    assert_same_weights(ckpt.weights, weights)


def test_transformers5_rope_parameters_read_like_hub_rope_scaling():
    params = tiny_params(**LLAMA3_ROPE)
    hub = hf_config(params)
    v5 = {k: v for k, v in hub.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**hub["rope_scaling"], "rope_theta": hub["rope_theta"]}
    assert hf.params_from_config(v5, "config.json") == hf.params_from_config(hub, "config.json") == params


def test_eos_ids_from_generation_config_and_config(tmp_path, tiny):
    folder = write_hf(*tiny, tmp_path, config={"eos_token_id": [2, 5]})
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    ckpt = hf.read(folder)
    assert (ckpt.bos_id, ckpt.eos_ids) == (1, [2, 7, 5])


def test_tokenizer_json_preferred_over_tokenizer_model(tmp_path, tiny):
    folder = write_hf(*tiny, tmp_path, tokenizer="tokenizer.json")
    write_tokenizer(folder, "sentencepiece")
    ckpt = hf.read(folder)
    assert ckpt.tokenizer_name == "tokenizer.json"
    assert ckpt.tokenizer_bytes == (folder / "tokenizer.json").read_bytes()


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("config, expected", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "'gpt2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"rope_scaling": {**LLAMA3_SCALING, "original_max_position_embeddings": 4096}},
     "original_max_position_embeddings is 4096"),
    ({"rope_scaling": {**LLAMA3_SCALING, "low_freq_factor": 2.0}}, "low_freq_factor is 2.0"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"intermediate_size": 96}, "weight layers.0.feed_forward.w1.weight has shape [128, 64]"),
])
def test_refuses_config(tmp_path, tiny, config, expected):
    message = one_line_error(hf.read, write_hf(*tiny, tmp_path, config=config))
    assert "config.json" in message and expected in message


def test_unsupported_architecture_names_what_is_supported(tmp_path, tiny):
    message = one_line_error(hf.read, write_hf(*tiny, tmp_path, config={"architectures": ["MistralForCausalLM"],
                                                                          "model_type": "mistral"}))
    assert "LlamaForCausalLM" in message.split("expected")[1]


def test_missing_shard(tmp_path, tiny):
    folder = write_hf(*tiny, tmp_path, shards=3)
    (folder / "model-00002-of-00003.safetensors").unlink()
    message = one_line_error(hf.read, folder)
    assert "model-00002-of-00003.safetensors" in message and "missing" in message


def test_missing_weights_file(tmp_path, tiny):
    folder = write_hf(*tiny, tmp_path)
    (folder / "model.safetensors").unlink()
    assert "model.safetensors: missing" in one_line_error(hf.read, folder)


def test_corrupt_weights_file(tmp_path, tiny):
    folder = write_hf(*tiny, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "model.safetensors: not a readable safetensors file" in one_line_error(hf.read, folder)


@pytest.mark.parametrize("kind, name", [("sentencepiece", "tokenizer.model"), ("tokenizer.json", "tokenizer.json")])
def test_unreadable_tokenizer(tmp_path, tiny, kind, name):
    folder = write_hf(*tiny, tmp_path, tokenizer=kind)
    (folder / name).write_bytes(b"this is not a tokenizer\n")
    message = one_line_error(hf.read, folder)
    assert f"{name}: not " in message and "pytorch-tokenizers" in message


def test_missing_tokenizer(tmp_path, tiny):
    message = one_line_error(hf.read, write_hf(*tiny, tmp_path, tokenizer=None))
    assert "no tokenizer file" in message and "tokenizer.json" in message


def test_missing_config(tmp_path, tiny):
    folder = write_hf(*tiny, tmp_path)
    (folder / "config.json").unlink()
    assert "config.json: missing" in one_line_error(hf.read, folder)
