import json

import pytest

from ane_build import pipeline, recipe
from ane_build.checkpoint import canonical, gguf
from ane_build.stages import convert
from ane_build.util.errors import UserError
from tests.tiny_llama import tiny_params, tiny_weights, write_gguf, write_hf, write_meta

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


# --- chat templates ------------------------------------------------------------------------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def gguf_fetch_entry(tmp_path, template=None):
    """A fetch entry holding a tiny GGUF file (SentencePiece vocabulary), with ``template`` in its metadata."""
    folder = tmp_path / "fetch" / "source"
    folder.mkdir(parents=True)
    params = tiny_params()
    write_gguf(params, tiny_weights(params), folder / "m.gguf",
               metadata={gguf.CHAT_TEMPLATE: template} if template else None)
    return tmp_path / "fetch"


def hf_fetch_entry(tmp_path, tokenizer_config=None, tokenizer="sentencepiece", params=None):
    fetch = tmp_path / "fetch"
    folder = fetch / "source" / "model"
    params = params or tiny_params()
    write_hf(params, tiny_weights(params), folder, tokenizer=tokenizer)
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return fetch


def converted(fetch, out, chat=True):
    out.mkdir()
    metrics = convert.run({"fetch": fetch}, {"format": "auto", "chat": chat}, out)
    return metrics, canonical.read_info(out)


@pytest.mark.parametrize("fmt", ["gguf", "hf", "hf list"])
def test_the_checkpoints_chat_template_is_carried_beside_the_tokenizer(tmp_path, fmt):
    fetch = {"gguf": lambda: gguf_fetch_entry(tmp_path, TEMPLATE),
             "hf": lambda: hf_fetch_entry(tmp_path, {"chat_template": TEMPLATE}),
             "hf list": lambda: hf_fetch_entry(tmp_path, {"chat_template": [
                 {"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": TEMPLATE}]}),
             }[fmt]()
    metrics, info = converted(fetch, tmp_path / "convert")
    assert (tmp_path / "convert" / canonical.CHAT_TEMPLATE_FILE).read_text() == TEMPLATE
    assert info["chat_template"] == canonical.CHAT_TEMPLATE_FILE and metrics["chat_template"] is True
    assert info["eos_ids"] == [2]  # the template ends a turn with </s>, already eos


def test_a_model_without_chat_converts_as_before(tmp_path):
    _, info = converted(hf_fetch_entry(tmp_path), tmp_path / "convert", chat=False)
    assert info["chat_template"] is None and not (tmp_path / "convert" / canonical.CHAT_TEMPLATE_FILE).exists()


@pytest.mark.parametrize("fmt", ["gguf", "hf", "meta"])
def test_a_chat_recipe_whose_checkpoint_has_no_template_is_one_line(tmp_path, fmt):
    fetch = gguf_fetch_entry(tmp_path) if fmt == "gguf" else fetch_entry(tmp_path, fmt, tiny_params())
    src = fetch / "source" / ("m.gguf" if fmt == "gguf" else "model")
    expected = {"gguf": "no GGUF metadata key tokenizer.chat_template",
                "hf": "no chat_template.jinja, and no chat_template in tokenizer_config.json",
                "meta": "a Meta folder keeps none: convert the model's Hugging Face or GGUF checkpoint"}[fmt]
    with pytest.raises(UserError) as error:
        converted(fetch, tmp_path / "convert")
    assert str(error.value) == f"chat: true, but the checkpoint {src} has no chat template ({expected})"


def test_the_pipeline_names_the_recipe_and_hands_convert_the_chat_key(tmp_path):
    rec = {**recipe.validate({"source": {"path": "x"}, "chat": True}, "recipes/m/d.yaml"),
           "name": "m/d", "path": "recipes/m/d.yaml"}
    stage = pipeline.BY_NAME["convert"]
    assert pipeline.run_params(stage, rec) == {"format": "auto", "chat": True}
    assert pipeline.key_params(stage, rec, None) == {"convert": {"format": "auto"}, "chat": True}
    with pytest.raises(UserError) as error, pipeline.naming_recipe(rec):
        converted(gguf_fetch_entry(tmp_path), tmp_path / "convert")
    assert str(error.value).startswith("recipes/m/d.yaml: chat: true, but the checkpoint ")


def test_the_token_that_ends_a_turn_joins_the_eos_ids(tmp_path):
    # Llama 3's tokenizer: the checkpoint's eos is <|end_of_text|> alone, its turns end with <|eot_id|>.
    template = "{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}"
    params = tiny_params(vocab_size=518)
    fetch = hf_fetch_entry(tmp_path, {"chat_template": template}, tokenizer="tiktoken", params=params)
    config = fetch / "source" / "model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "bos_token_id": 262, "eos_token_id": 263}))
    _, info = converted(fetch, tmp_path / "convert")
    assert info["eos_ids"] == [263, 262 + 9]  # <|eot_id|>, Llama 3's tenth special token


def test_a_template_that_does_not_render_is_one_line(tmp_path):
    fetch = gguf_fetch_entry(tmp_path, "{{ raise_exception('System role not supported') }}")
    with pytest.raises(UserError) as error:
        converted(fetch, tmp_path / "convert")
    assert str(error.value) == (f"{fetch / 'source' / 'm.gguf'} (chat template): the chat template fails to render "
                                "a conversation (System role not supported)")
