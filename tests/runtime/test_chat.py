from datetime import datetime

import pytest

from ane_build.runtime.chat import Chat, ChatTemplate, open_chat
from ane_build.runtime.tokenizer import Tokenizer
from ane_build.util.errors import UserError
from tests.tiny_llama import TOKENIZERS, write_tokenizer

# ChatML as SmolLM2's GGUF writes it (a system turn first unless the conversation brings one), laid
# out as hand-written templates are, block tags indented on lines of their own: trim_blocks and
# lstrip_blocks keep that layout out of the text.
CHATML = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a tiny model.<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""
# Llama 2's form, over the tiny tokenizers' own special tokens.
TURNS = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
         "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
HELLO = [{"role": "user", "content": "the quick brown fox"}]


def test_a_chatml_template_renders_as_transformers_renders_it():
    from transformers.utils.chat_template_utils import render_jinja_template

    text = ChatTemplate(CHATML, "t").render(HELLO)
    assert text == ("<|im_start|>system\nYou are a tiny model.<|im_end|>\n<|im_start|>user\nthe quick brown fox"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert text == render_jinja_template([HELLO], chat_template=CHATML, add_generation_prompt=True)[0][0]
    assert ChatTemplate(CHATML, "t").render(HELLO, add_generation_prompt=False).endswith("fox<|im_end|>\n")


def test_the_same_text_as_transformers_apply_chat_template():
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ("{{ bos_token }}{% for m in messages %}{{ m.role | upper }}: {{ m.content | tojson }}\n"
                "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT: ' + strftime_now('%d %b %Y') }}{% endif %}")
    messages = HELLO + [{"role": "assistant", "content": "<b>jumps</b> \"over\""}, *HELLO]
    now = datetime.now()  # transformers' strftime_now tells the clock
    ours = ChatTemplate(template, "t", "<s>", "</s>").render(messages)
    theirs, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                      bos_token="<s>", eos_token="</s>")
    assert ours == theirs[0] and ours.endswith(now.strftime("%d %b %Y"))


def test_a_fixed_date_makes_the_rendering_reproducible():
    template = "{{ strftime_now('%Y-%m-%d') }}"
    assert ChatTemplate(template, "t", now=datetime(2025, 1, 1)).render(HELLO) == "2025-01-01"


@pytest.mark.parametrize("template, reason", [
    ("{% for m in messages %}", "the chat template is not valid Jinja (Unexpected end of template."),
    ("{{ raise_exception('Conversation roles must alternate') }}",
     "the chat template fails to render a conversation (Conversation roles must alternate)"),
    ("{{ messages.append(1) }}", "the chat template fails to render a conversation (access to attribute 'append'"),
    ("{{ messages[0].__class__.__mro__ }}", "the chat template fails to render a conversation ("),
])
def test_a_template_that_fails_is_one_line_naming_it(template, reason):
    with pytest.raises(UserError) as error:
        ChatTemplate(template, "ckpt/chat_template.jinja").render(HELLO)
    message = str(error.value)
    assert message.startswith(f"ckpt/chat_template.jinja: {reason}") and "\n" not in message


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    def make(kind):
        return Tokenizer(write_tokenizer(tmp_path_factory.mktemp(kind.replace(".", "_")), kind))
    return {kind: make(kind) for kind in TOKENIZERS}


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_the_template_writes_the_only_bos(tokenizers, kind):
    tokenizer = tokenizers[kind]
    text, ids = Chat(TURNS, tokenizer, 1, [2], "t").prompt("the quick brown fox")
    assert text == "<s>[INST] the quick brown fox [/INST]"
    assert ids[0] == 1 and 1 not in ids[1:]
    assert ids[1:] == tokenizer.chat_ids("[INST] the quick brown fox [/INST]")


def test_chat_ids_are_transformers_ids(tokenizers):
    from transformers import PreTrainedTokenizerFast

    tokenizer = tokenizers["tokenizer.json"]
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer.path), bos_token="<s>", eos_token="</s>")
    messages = HELLO + [{"role": "assistant", "content": "a lazy dog"}] + HELLO
    text = Chat(TURNS, tokenizer, 1, [2], "t").template.render(messages)
    reference.chat_template = TURNS
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert tokenizer.chat_ids(text) == expected["input_ids"]
    assert tokenizer.chat_ids(text).count(2) == 1  # </s> inside the text is the token, not its letters


def test_llama3_special_tokens_are_tokens(tokenizers):
    tokenizer = tokenizers["tiktoken"]
    template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}")
    chat = Chat(template, tokenizer, tokenizer.bos_id, list(tokenizer.eos_ids), "t")
    specials = tokenizer.special_tokens()
    _, ids = chat.prompt("the cat")
    assert ids[:2] == [specials["<|begin_of_text|>"], specials["<|start_header_id|>"]]
    assert ids[-1] == specials["<|eot_id|>"] == chat.end_of_turn()


@pytest.mark.parametrize("template, end", [(TURNS, 2), ("{% for m in messages %}{{ m['content'] }}{% endfor %}", None)])
def test_the_token_that_ends_a_turn(tokenizers, template, end):
    assert Chat(template, tokenizers["sentencepiece"], 1, [2], "t").end_of_turn() == end


def test_a_template_file_that_is_not_there(tokenizers, tmp_path):
    with pytest.raises(UserError) as error:
        open_chat(tmp_path / "chat_template.jinja", tokenizers["sentencepiece"], 1, [2])
    assert str(error.value) == f"{tmp_path / 'chat_template.jinja'}: no such chat template file"
