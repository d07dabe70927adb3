"""``ane-build export`` / ``python -m ane_build.cli.export``: the seed export.py's flags, same meanings.

It runs the very stage code the recipes use (rewrite, quantize, export) on a checkpoint
given as ``-p params.json -c checkpoint``, in a scratch folder, and writes the Core ML
``.pte`` to ``-n`` (its CPU twin, delegation report and Neural Engine lint beside it). Without
``--decode_method`` the program has the seed's single ``forward`` method; with it, upstream's
multifunction pair (a one-token ``forward``, a seq_length ``prefill``); ``--verify_method`` adds
``verify`` (every position's logits).
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

from ane_build import recipe
from ane_build.checkpoint import canonical, jsonfiles, meta
from ane_build.util import command
from ane_build.util.errors import UserError

# Recipe fields as the seed's flags spell them, so an error names what the user typed.
FLAGS = {
    "ane.seq_length": "--seq_length", "ane.max_seq_length": "--max_seq_length", "ane.cache_size": "--cache_size",
    "ane.target_split_size": "--target_split_size", "ane.max_splits": "--max_splits", "ane.dtype": "--dtype",
    "quantize.linear": "--coreml-quantize", "quantize.embedding": "-E/--embedding-quantize",
    "quantize.group_size": "--group_size", "export.minimum_deployment_target": "--minimum_deployment_target",
    "export.compute_unit": "--compute_unit", "export.max_payload_mb": "--max_payload_mb",
}


def add_arguments(parser):
    parser.add_argument("-n", "--output_name", default="model.pte", help="the .pte to write")
    parser.add_argument("-p", "--params", required=True, help="params.json (the seed's ModelArgs fields)")
    parser.add_argument("-c", "--checkpoint", required=True, help="weights: a .pth or .safetensors in Meta names")
    parser.add_argument("--seq_length", type=int, default=1, help="tokens per forward call")
    parser.add_argument("--max_seq_length", type=int, default=128, help="the context the caches cover")
    parser.add_argument("--cache_size", type=int, help="KV cache slots; default max_seq_length - 1 with "
                        "--decode_method, else max_seq_length - seq_length")
    parser.add_argument("-E", "--embedding-quantize", help="'bits,group', e.g. '4,32' (group 0: per channel)")
    parser.add_argument("--coreml-quantize", choices=["b4w", "c4w", "c8w"],
                        help="linear weights: 4 bits per block or channel (the seed's), 8 per channel")
    parser.add_argument("--use_cache_list", action="store_true", help="one 4D cache per layer, not one 5D tensor")
    parser.add_argument("--target_split_size", type=int, help="split linear layers into chunks of this size")
    parser.add_argument("--max_splits", type=int, default=8, help="at most this many chunks per linear")
    parser.add_argument("--dtype", default="fp16", help="fp16 or fp32")
    # Beyond the seed: what recipes can set too.
    parser.add_argument("--decode_method", action="store_true",
                        help="forward decodes one token and prefill takes seq_length (upstream's multifunction form)")
    parser.add_argument("--verify_method", action="store_true",
                        help="add verify: seq_length tokens, every position's logits (lookahead decoding)")
    parser.add_argument("--group_size", type=int, default=32, help="b4w block size")
    parser.add_argument("--minimum_deployment_target", default="iOS18")
    parser.add_argument("--compute_unit", default="CPU_AND_NE")
    parser.add_argument("--max_payload_mb", type=float, default=1000,
                        help="cut the Core ML program between layers into payloads of at most this many MB of weights")
    return parser


def recipe_from_flags(args):
    """The flags as a recipe, checked by the same rules as a YAML recipe."""
    data = {
        "source": {"path": str(Path(args.checkpoint).resolve())},
        "ane": {"dtype": args.dtype, "seq_length": args.seq_length, "max_seq_length": args.max_seq_length,
                "cache_size": args.cache_size, "use_cache_list": args.use_cache_list,
                "target_split_size": args.target_split_size, "max_splits": args.max_splits,
                "decode_method": args.decode_method, "verify_method": args.verify_method},
        "quantize": {"linear": args.coreml_quantize or "none", "group_size": args.group_size,
                     "embedding": args.embedding_quantize},
        # The seed reports what stays on the CPU but does not fail on it; likewise the Neural Engine lint.
        "export": {"minimum_deployment_target": args.minimum_deployment_target,
                   "compute_unit": args.compute_unit, "max_payload_mb": args.max_payload_mb,
                   "require_full_delegation": False, "ane_lint": "warn"},
    }
    try:
        return recipe.validate(data, "")
    except UserError as e:
        raise UserError("ane-build export", _flag_names(str(e))) from None


def _flag_names(message):
    for field, flag in FLAGS.items():
        if message.startswith(field + ":"):
            return flag + message[len(field):]
    return message


def checkpoint_folder(params_path, checkpoint_path, out_dir):
    """A canonical checkpoint (no tokenizer) from the seed's -p/-c files."""
    weights = _load_weights(Path(checkpoint_path))
    params = meta.params_from_meta(jsonfiles.read(Path(params_path)), weights, params_path)
    tied = "output.weight" not in weights
    if tied and "tok_embeddings.weight" in weights:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    canonical.check_shapes(params, weights, str(checkpoint_path))
    canonical.write(canonical.Checkpoint(params, weights, None, None, None, [], "seed-flags", tied), out_dir)


def _load_weights(path):
    if not path.is_file():
        raise UserError(str(path), "checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise UserError(str(path), f"not a readable safetensors file ({e})") from None
    return meta.load_pth(path)


def export(args):
    """Run rewrite -> quantize -> export on the flags' checkpoint; returns the written .pte path."""
    from ane_build import pipeline
    from ane_build.util.memory import release_memory

    rec = recipe_from_flags(args)
    output = Path(args.output_name)
    with tempfile.TemporaryDirectory(prefix="ane-build-export-") as scratch:
        entries = {"convert": Path(scratch) / "convert"}
        entries["convert"].mkdir()
        checkpoint_folder(args.params, args.checkpoint, entries["convert"])
        for name in ("rewrite", "quantize", "export"):
            # One process runs every stage: each starts with what the last one freed handed back.
            release_memory()
            stage = pipeline.BY_NAME[name]
            entries[name] = Path(scratch) / name
            entries[name].mkdir()
            inputs = {up: entries[up] for up in pipeline.upstream_of(stage, rec)}
            stage.module.run(inputs, pipeline.run_params(stage, rec), entries[name])
        _publish(entries["export"], output)
    return output


def _publish(export_entry, output):
    """model.pte -> output (temp file + rename); its twin and reports beside it, named after it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    for src, dest in ((export_entry / "model.pte", output),
                      (export_entry / "twin.pte", output.with_name(output.stem + ".twin.pte")),
                      (export_entry / "delegation.txt", output.with_name(output.stem + ".delegation.txt")),
                      (export_entry / "lint.md", output.with_name(output.stem + ".lint.md")),
                      (export_entry / "lint.json", output.with_name(output.stem + ".lint.json"))):
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)


def main(args):
    path = export(args)
    print(f"wrote {path}")
    return 0


def entry(argv=None):
    return command.run("python -m ane_build.cli.export", __doc__, add_arguments, main, argv)


if __name__ == "__main__":
    sys.exit(entry())
