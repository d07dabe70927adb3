"""Chat prompts: a chat-tuned model reads a user's message through its checkpoint's chat template.

The template is the checkpoint's own Jinja text (GGUF ``tokenizer.chat_template``, Hugging Face
``chat_template``), kept as ``chat_template.jinja`` beside the tokenizer from convert to the release
bundle. It renders as transformers' ``apply_chat_template`` renders it: jinja2's immutable sandbox
(the text comes with a download), ``trim_blocks`` and ``lstrip_blocks``, loop controls, the helpers
``raise_exception``, ``tojson`` and ``strftime_now``, and the variables ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``. The template writes every special token
itself, bos included, so its text is encoded with nothing added (``Tokenizer.chat_ids``).
"""

import json
from datetime import datetime
from pathlib import Path

from ane_build.checkpoint.canonical import CHAT_TEMPLATE_FILE
from ane_build.util.errors import UserError

# An assistant's message whose end shows what the template writes after a turn (no whitespace, which
# templates may trim, and nothing a template would escape).
_REPLY = "ANEBUILDREPLY"


class ChatTemplate:
    """A chat template compiled once, with the special tokens' text it may write."""

    def __init__(self, text, where, bos_token="", eos_token="", now=None):
        """``where``: what an error names (the template's file or checkpoint). ``now``: the time
        ``strftime_now`` tells (default: the clock; a fixed one makes the rendering reproducible)."""
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.where, self.tokens = where, {"bos_token": bos_token, "eos_token": eos_token}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise_exception,
                           strftime_now=lambda fmt: (now or datetime.now()).strftime(fmt))
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateError as e:
            raise UserError(where, f"the chat template is not valid Jinja ({_reason(e)})") from None

    def render(self, messages, add_generation_prompt=True):
        """The text of ``messages`` ([{role, content}]), ending in the assistant's turn's opening."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.tokens)
        except Exception as e:  # noqa: BLE001 - a template's code fails in assorted ways, all the template's
            raise UserError(self.where, f"the chat template fails to render a conversation ({_reason(e)})") from None


class Chat:
    """A checkpoint's chat template with its tokenizer: a user's message -> the ids the model reads."""

    def __init__(self, text, tokenizer, bos_id, eos_ids, where, now=None):
        def spelled(token_id):
            return tokenizer.token(token_id) if token_id is not None else ""

        self.tokenizer = tokenizer
        self.template = ChatTemplate(text, where, spelled(bos_id), spelled(eos_ids[0] if eos_ids else None), now)

    def prompt(self, message):
        """(the rendered text, its ids) of one user ``message``, the assistant's reply to follow."""
        text = self.template.render([{"role": "user", "content": message}])
        return text, self.tokenizer.chat_ids(text)

    def end_of_turn(self):
        """The id of the special token the template ends an assistant's turn with (``<|im_end|>``,
        ``<|eot_id|>``, ``</s>``), or None where it ends one with none."""
        text = self.template.render([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _REPLY}],
                                    add_generation_prompt=False)
        after = text.rsplit(_REPLY, 1)[1].lstrip() if _REPLY in text else ""
        specials = self.tokenizer.special_tokens()
        return next((specials[t] for t in sorted(specials, key=len, reverse=True) if t and after.startswith(t)), None)


def open_chat(path, tokenizer, bos_id, eos_ids, now=None):
    """The Chat of template file ``path``; a file that is not there or not UTF-8 is one error naming it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        raise UserError(str(path), "no such chat template file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(str(path), f"cannot read the chat template ({getattr(e, 'reason', None) or e})") from None
    return Chat(text, tokenizer, bos_id, eos_ids, str(path), now)


def for_program(path, tokenizer, info, now=None):
    """The Chat of template file ``path`` for the program ``info`` describes: its bos and stop ids, the
    tokenizer's where the program states none (as ``Tokenizer.prompt_ids`` and ``stop_ids`` choose)."""
    bos_id = info.bos_id if info.bos_id is not None else tokenizer.bos_id
    return open_chat(path, tokenizer, bos_id, tokenizer.stop_ids(info), now)


def beside(tokenizer_path):
    """Where a chat template sits beside a tokenizer file (entries and bundles keep it there)."""
    return Path(tokenizer_path).parent / CHAT_TEMPLATE_FILE


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: Jinja's own escapes HTML characters, which a prompt must not see.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _reason(error):
    return " ".join(str(error).split()) or type(error).__name__
