"""Meta's own Llama folders (params.json, consolidated.00.pth, tokenizer.model) -> canonical checkpoint.

Model-parallel checkpoints (consolidated.00.pth, consolidated.01.pth, ...) are refused rather
than merged: how each tensor was split differs between Llama releases (the embedding is split
by columns in Llama 2 and by rows in Llama 3), and only models far too big for the Neural
Engine (13B and up) ship that way.
"""

import logging
import pickle
import re
import zipfile
from pathlib import Path

from ane_build.checkpoint import canonical, jsonfiles, tokenizer_files
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+)")


def read(folder):
    folder = Path(folder)
    params_path = folder / PARAMS_FILE
    raw = jsonfiles.read(params_path)
    # The tokenizer before the weights: a bad one fails in a second, not after gigabytes.
    tok = tokenizer_files.load(tokenizer_files.find(folder, (TOKENIZER_FILE,)))
    weights = load_pth(_weights_file(folder))
    params = params_from_meta(raw, weights, params_path)
    # Without output.weight the checkpoint is only a complete Llama if the output shares the embedding.
    tied = "output.weight" not in weights and "tok_embeddings.weight" in weights
    if tied:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    canonical.check_shapes(params, weights, str(params_path))
    log.info("read Meta Llama: %d layers, %s tokenizer, bos %s, eos %s",
             params["n_layers"], tok.kind, tok.bos_id, tok.eos_ids)
    return canonical.Checkpoint(params, weights, TOKENIZER_FILE, tok.path.read_bytes(), tok.bos_id,
                                list(tok.eos_ids), source_format="meta", tied_embeddings=tied)


def params_from_meta(raw, weights, path):
    """Canonical params from Meta's params.json; defaults are Meta's ``ModelArgs``."""
    dim = jsonfiles.require(raw, "dim", path)
    n_heads = jsonfiles.require(raw, "n_heads", path)
    params = {
        "dim": dim,
        "n_layers": jsonfiles.require(raw, "n_layers", path),
        "n_heads": n_heads,
        "n_kv_heads": raw.get("n_kv_heads") or n_heads,
        "head_dim": raw.get("head_dim") or dim // n_heads,
        "hidden_dim": raw.get("hidden_dim")
        or ffn_hidden_dim(dim, raw.get("multiple_of", 256), raw.get("ffn_dim_multiplier")),
        "vocab_size": _vocab_size(raw, weights, path),
        "norm_eps": raw.get("norm_eps", 1e-5),
        "rope_theta": float(raw.get("rope_theta", 10000.0)),
        "use_scaled_rope": bool(raw.get("use_scaled_rope", False)),
    }
    if params["use_scaled_rope"]:
        params.update(_rope_scaling(raw, path))
    return params


def ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier):
    """The SwiGLU width Meta's (and ExecuTorch's) ModelArgs derive when params.json has none."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return -(-hidden // multiple_of) * multiple_of


def _vocab_size(raw, weights, path):
    vocab = raw.get("vocab_size", -1)
    if vocab > 0:
        return vocab
    # Llama 2's params.json says -1: the size comes from the tokenizer the weights were trained with.
    if "tok_embeddings.weight" not in weights:
        raise UserError(str(path), "vocab_size is -1 and the weights have no tok_embeddings.weight")
    return weights["tok_embeddings.weight"].shape[0]


def _rope_scaling(raw, path):
    # Meta's params.json only says use_scaled_rope; the factor differs by release (8 for
    # Llama 3.1 / 3.3, 32 for Llama 3.2 1B / 3B), so it has to be stated, not guessed.
    factor = raw.get("rope_scale_factor", raw.get("rope_scaling_factor"))
    if factor is None:
        raise UserError(str(path), 'use_scaled_rope is true but "rope_scale_factor" is not set; '
                                   "add it (8 for Llama 3.1 / 3.3, 32 for Llama 3.2 1B / 3B)")
    high = raw.get("high_freq_factor", raw.get("rope_high_freq_factor", 4))
    return {"rope_scale_factor": float(factor), "high_freq_factor": float(high)}


def _weights_file(folder):
    files = sorted(folder.glob("consolidated*.pth"))
    if not files:
        raise UserError(str(folder / "consolidated.00.pth"), "missing: no consolidated*.pth weights")
    if len(files) > 1:
        raise UserError(str(folder), f"{len(files)} model-parallel shards ({files[0].name} ...) are not "
                                     "supported; use a single-file checkpoint or the Hugging Face form")
    return files[0]


def load_pth(path):
    """The tensors of a ``.pth``, loaded with ``weights_only=True`` (nothing else is unpickled)."""
    import torch

    try:
        # Memory-map when we can; pre-1.6 (non-zip) files cannot be.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise UserError(str(path), _unpickling_message(str(e))) from None
    except (RuntimeError, EOFError) as e:
        raise UserError(str(path), f"not a readable PyTorch file ({str(e).splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # some training checkpoints nest the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(str(path), "expected a dict of weight name -> tensor")
    obj.pop("rope.freqs", None)  # a buffer in Llama 2 checkpoints, recomputed from rope_theta
    return dict(obj)


def _unpickling_message(text):
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        return (f"refused: it holds a pickled Python object ({found.group(1)}), not only tensors; "
                "checkpoints are loaded with weights_only=True")
    detail = _UNPICKLER_ERROR.search(text)
    return f"not a PyTorch weights file ({detail.group(1) if detail else 'unpickling failed'})"
