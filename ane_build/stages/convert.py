"""convert: the fetched checkpoint (GGUF file, Hugging Face folder or Meta folder) -> canonical form."""

import logging
from pathlib import Path

from ane_build.checkpoint import canonical
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
FORMATS = ("auto", "gguf", "hf", "meta")


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
    """inputs: {"fetch": entry dir}; params: {"format": one of FORMATS}."""
    src = source_path(inputs["fetch"])
    fmt = params.get("format", "auto")
    if fmt == "auto":
        fmt = detect_format(src)
    if fmt == "gguf" and src.is_dir():
        src = next(src.glob("*.gguf"))
    log.info("converting %s checkpoint %s", fmt, src.name)
    ckpt = _reader(fmt).read(src)
    canonical.write(ckpt, out_dir)
    if ckpt.tokenizer_name:
        _check_tokenizer_fits(Path(out_dir) / ckpt.tokenizer_name, ckpt.params["vocab_size"], src)
    counted = {k: t for k, t in ckpt.weights.items() if not (ckpt.tied_embeddings and k == "output.weight")}
    return {"format": fmt, "n_params": sum(t.numel() for t in counted.values())}


def _check_tokenizer_fits(tokenizer_path, vocab_size, src):
    """Refuse a tokenizer with ids past the embedding, named as the checkpoint given (not the store's copy)."""
    from ane_build.runtime.tokenizer import Tokenizer

    Tokenizer(tokenizer_path).check_fits(vocab_size, "the checkpoint", where=f"{src} ({tokenizer_path.name})")


def source_path(fetch_dir):
    """The fetched file or folder inside a fetch entry (``<entry>/source/<name>``)."""
    items = sorted((Path(fetch_dir) / "source").iterdir())
    return items[0] if len(items) == 1 else Path(fetch_dir) / "source"
