"""convert: the fetched checkpoint (GGUF file, Hugging Face folder or Meta folder) -> canonical form.

A recipe with ``chat: true`` (a chat-tuned model) needs the checkpoint's chat template: convert
checks that it renders, and that the token closing an assistant's turn ends generation (the
checkpoint's eos ids gain it when they lack it, so the program's ``eos_ids`` stop a chat).
"""

import logging
from pathlib import Path

from ane_build.checkpoint import canonical
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
FORMATS = ("auto", "gguf", "hf", "meta")
# Where each format keeps a chat template, as a chat model's missing one is reported.
NO_TEMPLATE = {"gguf": "no GGUF metadata key tokenizer.chat_template",
               "hf": "no chat_template.jinja, and no chat_template in tokenizer_config.json",
               "meta": "a Meta folder keeps none: convert the model's Hugging Face or GGUF checkpoint"}


def detect_format(src):
    """The format of a fetched source: a .gguf file, or a folder with config.json / params.json."""
    src = Path(src)
    if src.is_file():
        if _magic(src) == b"GGUF":
            return "gguf"
        raise UserError(str(src), "not a GGUF file (no GGUF magic) and not a checkpoint folder")
    if (src / "config.json").is_file():
        return "hf"
    if (src / "params.json").is_file():
        return "meta"
    ggufs = sorted(src.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise UserError(str(src), "expected a .gguf file, a Hugging Face folder (config.json) "
                              "or a Meta folder (params.json)")


def _magic(path):
    with open(path, "rb") as f:
        return f.read(4)


def _reader(fmt):
    # Imported on demand: each reader pulls in its own heavy dependencies.
    if fmt == "gguf":
        from ane_build.checkpoint import gguf as reader
    elif fmt == "hf":
        from ane_build.checkpoint import hf as reader
    else:
        from ane_build.checkpoint import meta as reader
    return reader


def run(inputs, params, out_dir):
    """inputs: {"fetch": entry dir}; params: {"format": one of FORMATS, "chat": the recipe's ``chat``}."""
    src = source_path(inputs["fetch"])
    fmt = params.get("format", "auto")
    if fmt == "auto":
        fmt = detect_format(src)
    if fmt == "gguf" and src.is_dir():
        src = next(src.glob("*.gguf"))
    log.info("converting %s checkpoint %s", fmt, src.name)
    ckpt = _reader(fmt).read(src)
    if params.get("chat") and not ckpt.chat_template:
        raise UserError("chat", f"true, but the checkpoint {src} has no chat template ({NO_TEMPLATE[fmt]})")
    canonical.write(ckpt, out_dir)
    if ckpt.tokenizer_name:
        _check_tokenizer_fits(Path(out_dir) / ckpt.tokenizer_name, ckpt.params["vocab_size"], src)
    if params.get("chat"):
        _check_chat(ckpt, src, Path(out_dir))
    counted = {k: t for k, t in ckpt.weights.items() if not (ckpt.tied_embeddings and k == "output.weight")}
    return {"format": fmt, "n_params": sum(t.numel() for t in counted.values()),
            "chat_template": ckpt.chat_template is not None}


def _check_tokenizer_fits(tokenizer_path, vocab_size, src):
    """Refuse a tokenizer with ids past the embedding, named as the checkpoint given (not the store's copy)."""
    from ane_build.runtime.tokenizer import Tokenizer

    Tokenizer(tokenizer_path).check_fits(vocab_size, "the checkpoint", where=f"{src} ({tokenizer_path.name})")


def _check_chat(ckpt, src, out_dir):
    """A chat model's template renders, and the token that ends its assistant turns stops generation."""
    from ane_build.runtime.chat import Chat
    from ane_build.runtime.tokenizer import Tokenizer

    chat = Chat(ckpt.chat_template, Tokenizer(out_dir / ckpt.tokenizer_name), ckpt.bos_id, ckpt.eos_ids,
                where=f"{src} (chat template)")
    chat.prompt("Hello")
    end = chat.end_of_turn()
    if end is None:
        log.warning("%s: its chat template ends an assistant's turn with no special token: generation stops at "
                    "eos ids %s only", src, ckpt.eos_ids)
    elif end not in ckpt.eos_ids:
        log.info("%s: the chat template ends an assistant's turn with token %d: added to the eos ids", src, end)
        canonical.update_info(out_dir, eos_ids=[*ckpt.eos_ids, end])


def source_path(fetch_dir):
    """The fetched file or folder inside a fetch entry (``<entry>/source/<name>``)."""
    items = sorted((Path(fetch_dir) / "source").iterdir())
    return items[0] if len(items) == 1 else Path(fetch_dir) / "source"
