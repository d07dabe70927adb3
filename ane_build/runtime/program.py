"""What the runner drives: an ExecuTorch ``.pte``, or the eager ``AneLlama`` of a checkpoint.

Both offer the same three things, so one generation loop drives either:

- ``info``: a ``ModelInfo`` (shapes, context, dtype, special ids);
- ``methods``: {method name: tokens per call}: upstream's names, a one-token "forward" and a
  seq_length "prefill", or the seed's single seq_length "forward"; and "verify" (seq_length,
  every position's logits) where the program has it;
- ``rope``: the rotary table (cos, sin [max_seq_length, head_dim / 2]) a call's rows come from;
- ``run(method, call)`` -> (logits [rows, vocab], new k rows, new v rows), for the inputs a
  ``kv_cache.Call`` holds (one row of logits, a verify call's one per position).

A ``.pte``'s shapes are read from its methods' inputs, the one truth about what it
accepts (as the seed's run.py does). Its constant methods (``io.constant_methods``) add what
the inputs cannot tell, the context length and its rotary table, bos and eos ids, and must
agree with the inputs on the rest.
"""

import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ane_build.checkpoint import canonical, jsonfiles, meta
from ane_build.model import rewrites
from ane_build.model.ane_llama import AneLlama, logit_rows, rope_table
from ane_build.model.io import VERIFY
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)

METHODS = ("forward", "prefill", VERIFY)
# io.runner_metadata's constant methods; each returns a one-element list but eos_ids.
CONSTANTS = ("seq_length", "max_seq_length", "cache_size", "n_layers", "n_kv_heads", "head_dim", "dtype",
             "vocab_size", "use_cache_list", "bos_id", "eos_ids")
_SCALAR_TYPES = {5: "fp16", 6: "fp32"}  # ExecuTorch ScalarType codes of the dtypes we export


@dataclass(frozen=True)
class ModelInfo:
    seq_length: int  # tokens per call of the longest method (the prefill's)
    max_seq_length: int  # positions the RoPE tables cover: the whole context
    cache_size: int  # the window of past tokens a call attends to
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype: str  # "fp16" or "fp32": the caches' and the mask's
    vocab_size: int
    use_cache_list: bool  # one [1, heads, cache, dim] cache per layer, else one 5-D tensor
    bos_id: int | None = None
    eos_ids: tuple = ()

    @property
    def torch_dtype(self):
        return rewrites.DTYPES[self.dtype]


class PteProgram:
    """A ``.pte`` loaded through ``executorch.runtime``.

    The shape flags (the command line's) may fill in what the program does not state, and must
    agree with what it does.
    """

    def __init__(self, path, *, seq_length=None, max_seq_length=None, cache_size=None, dtype=None):
        self.path = Path(path)
        flags = {"seq_length": seq_length, "max_seq_length": max_seq_length, "cache_size": cache_size,
                 "dtype": dtype}
        program = _load_program(self.path)
        if "forward" not in program.method_names:
            raise UserError(str(self.path), f"no forward method (it has {', '.join(sorted(program.method_names))})")
        # Loaded first: a Core ML program on Linux is the likeliest mistake, and fails here.
        self._loaded = {name: _load_method(self.path, program, name) for name in METHODS
                        if name in program.method_names}
        metas = {name: method.metadata for name, method in self._loaded.items()}
        self.methods, self.rope, shapes = read_shapes(self.path, program, metas)
        constants = {name: _constant(program, name) for name in CONSTANTS if name in program.method_names}
        self.info = _model_info(self.path, shapes, constants, flags)
        log.info("loaded %s: %s", self.path.name, ", ".join(f"{m} {n} tokens/call" for m, n in self.methods.items()))

    def run(self, method, call):
        out = self._loaded[method].execute(call.flat)
        if self.info.use_cache_list:
            n = self.info.n_layers
            return logit_rows(out[0]), out[1:1 + n], out[1 + n:]
        return logit_rows(out[0]), out[1], out[2]


def _load_program(path):
    if not path.is_file():
        raise UserError(str(path), "no such file")
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(path)
    except RuntimeError as e:
        raise UserError(str(path), f"not an ExecuTorch program (.pte) ({e})") from None


def _load_method(path, program, name):
    from executorch.runtime import Runtime

    try:
        return program.load_method(name)
    except RuntimeError as e:
        backends = ", ".join(Runtime.get().backend_registry.registered_backend_names)
        raise UserError(str(path), f"method {name} does not load ({e}): it needs a backend this runtime "
                                   f"lacks (it has {backends}); a Core ML .pte runs where the Core ML backend "
                                   "is (macOS), elsewhere run its CPU twin, twin.pte") from None


def read_shapes(path, program, metas):
    """(methods, rope, the ModelInfo fields the program's shapes state) of a program whose methods'
    metadata are ``metas``: what the methods take, the rotary table and its length."""
    shapes = _input_shapes(path, metas["forward"])
    methods = {name: meta.input_tensor_meta(0).sizes()[1] for name, meta in metas.items()}
    rope = read_rope(path, program)
    return methods, rope, {**shapes, "seq_length": max(methods.values()), "max_seq_length": len(rope[0])}


def _input_shapes(path, method_meta):
    """ModelInfo fields that a method's inputs and output state (the calling convention of
    ``model.ane_llama``)."""
    n_inputs = method_meta.num_inputs()
    sizes = [tuple(method_meta.input_tensor_meta(i).sizes()) for i in range(n_inputs)]
    if n_inputs < 7 or len(sizes[0]) != 2 or len(sizes[1]) != 3 or len(sizes[4]) not in (4, 5):
        raise UserError(str(path), f"forward takes inputs of shapes {sizes}; expected an ane-build Llama's "
                                   "(tokens, mask, freqs_cos, freqs_sin, k caches, v caches, "
                                   "last_valid_token_pos)")
    use_cache_list = len(sizes[4]) == 4
    # The first value cache follows the key caches: one input per layer, or one in all.
    n_layers = (n_inputs - 5) // 2 if use_cache_list else sizes[4][0]
    *_, n_kv_heads, cache_size, head_dim = sizes[4 + n_layers if use_cache_list else 5]
    code = method_meta.input_tensor_meta(4).dtype()
    if code not in _SCALAR_TYPES:
        raise UserError(str(path), f"caches of ExecuTorch dtype code {code}; expected fp16 or fp32")
    return {"cache_size": cache_size, "n_layers": n_layers,
            "n_kv_heads": n_kv_heads, "head_dim": head_dim, "dtype": _SCALAR_TYPES[code],
            "vocab_size": math.prod(method_meta.output_tensor_meta(0).sizes()[1:]), "use_cache_list": use_cache_list}


def read_rope(path, program):
    """The program's rotary table, from its constant methods ``freqs_cos`` and ``freqs_sin``."""
    missing = {"freqs_cos", "freqs_sin"} - set(program.method_names)
    if missing:
        raise UserError(str(path), f"has no {' or '.join(sorted(missing))} constant method (its rotary table): "
                                   "not a program of this ane-build; export it again")
    return tuple(program.load_method(name).execute([])[0] for name in ("freqs_cos", "freqs_sin"))


def _constant(program, name):
    value = program.load_method(name).execute([])
    return tuple(value) if name == "eos_ids" else value[0]


def _model_info(path, shapes, constants, flags):
    """The program's inputs, then its constant methods, then the flags: each may add, none contradict."""
    values = dict(shapes)
    for key, value in constants.items():
        if values.setdefault(key, value) != value:
            raise UserError(str(path), f"constant method {key} returns {value!r}, but forward's inputs say "
                                       f"{values[key]!r}")
    for key, value in flags.items():
        if value is not None and values.setdefault(key, value) != value:
            raise UserError(f"--{key}", f"{value!r} contradicts {path.name}, which has {key}={values[key]!r}")
    return ModelInfo(**{f.name: values[f.name] for f in fields(ModelInfo) if f.name in values})


class EagerProgram:
    """An ``AneLlama`` in eager PyTorch: the seed's ``--use_eager``. Any call length works, so it has
    the one-token "forward" and the seq_length "prefill" of a program with a decode method."""

    def __init__(self, model, info, rope):
        self.model, self.info, self.rope = model, info, rope
        self.methods = {"forward": 1, "prefill": info.seq_length, VERIFY: info.seq_length}

    def run(self, method, call):
        logits, new_k, new_v = self.model(*call.args)
        return logit_rows(logits), new_k, new_v


def open_eager(checkpoint, params=None, *, seq_length, max_seq_length, cache_size=None, dtype="fp32",
               use_cache_list=False):
    """An EagerProgram over a canonical checkpoint (its folder, or its model.safetensors) or a Meta
    ``.pth`` with ``params`` (a params.json; default: the one beside the weights)."""
    if seq_length is None or max_seq_length is None:
        raise UserError("--use_eager", "needs --seq_length and --max_seq_length (the shapes of the program "
                                       "it stands in for)")
    cache_size = max_seq_length - 1 if cache_size is None else cache_size
    if seq_length < 1 or not 1 <= cache_size < max_seq_length:
        raise UserError("--cache_size", f"expected 1..{max_seq_length - 1} (below max_seq_length="
                                        f"{max_seq_length}); got {cache_size}")
    model_params, weights, ids = read_checkpoint(Path(checkpoint), params)
    model = rewrites.apply(AneLlama.from_weights(model_params, weights), {"dtype": dtype}, where="--dtype")
    info = ModelInfo(seq_length, max_seq_length, cache_size, model_params["n_layers"],
                     model_params.get("n_kv_heads") or model_params["n_heads"], canonical.head_dim(model_params),
                     dtype, model_params["vocab_size"], use_cache_list, ids.get("bos_id"),
                     tuple(ids.get("eos_ids") or ()))
    return EagerProgram(model, info, rope_table(model_params, max_seq_length, info.torch_dtype))


def read_checkpoint(checkpoint, params_path=None):
    """(params, weights, {"bos_id", "eos_ids"} from checkpoint.json when there is one)."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    weights_file = folder / canonical.WEIGHTS_FILE if checkpoint.is_dir() else checkpoint
    if not weights_file.is_file():
        raise UserError(str(weights_file), "no such file (-c/--checkpoint: a canonical checkpoint folder, "
                                           "its model.safetensors or a .pth)")
    params_file = Path(params_path) if params_path else folder / canonical.PARAMS_FILE
    raw = jsonfiles.read(params_file, "no such file (-p/--params: the model's params.json)")
    if weights_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(str(weights_file))
    else:
        weights = meta.load_pth(weights_file)
    if "output.weight" not in weights and "tok_embeddings.weight" in weights:
        weights["output.weight"] = weights["tok_embeddings.weight"]  # tied embeddings
    model_params = meta.params_from_meta(raw, weights, params_file)
    canonical.check_shapes(model_params, weights, str(weights_file))
    info_file = folder / canonical.INFO_FILE
    return model_params, weights, canonical.read_info(folder) if info_file.is_file() else {}
