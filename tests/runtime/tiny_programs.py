"""The tiny Llama as the runner meets it, made in-test: CPU twins as the export stage lowers them, a
program without runner metadata, its canonical checkpoint, and the calls a run makes."""

import torch

from ane_build.checkpoint import canonical
from ane_build.model import io, rewrites
from ane_build.model.ane_llama import AneLlama
from ane_build.runtime.kv_cache import KVCache, feed
from ane_build.stages import export
from tests.stages.tiny_entries import ane, build
from tests.tiny_llama import sentencepiece_model, tiny_params, tiny_weights

# 8-token calls, a 12-token window, a 48-token context: a run passes the window several times.
SEQ, CACHE, MAX = 8, 12, 48
TWINS = {  # name -> ane overrides; fp32 and unquantized, to compare with the fp64 reference
    "list-decode": {"use_cache_list": True, "decode_method": True},
    "tensor": {"use_cache_list": False, "decode_method": False},
}
# Not in TWINS (too coarse for the fp64 reference): twins that runners are compared on with each other.
FP16_TWINS = {"list-decode-fp16": {"dtype": "fp16", "use_cache_list": True, "decode_method": True}}


def build_twin(root, name):
    """twin.pte as the export stage writes it (its Core ML half is not needed here, and is half the time)."""
    overrides = {"dtype": "fp32", **{**TWINS, **FP16_TWINS}[name]}
    ane_params = ane(seq_length=SEQ, max_seq_length=MAX, cache_size=CACHE, **overrides)
    entries, _ = build(root, "quantize", ane_params=ane_params, quantize_params={"linear": "none"})
    spec = io.read_spec(entries["quantize"])
    programs = export.load_programs(entries["quantize"], spec)
    path = root / export.TWIN_FILE
    export.write_pte(export.lower_twin(programs, io.constant_methods(spec)), path)
    return path


def export_without_metadata(path):
    """A forward-only program with portable kernels and no constant methods (as a bare export makes)."""
    from executorch.exir import to_edge

    params = tiny_params()
    model = rewrites.apply(AneLlama.from_weights(params, tiny_weights(params)), {"dtype": "fp32"})
    spec = {"params": params, "ane": {"dtype": "fp32", "cache_size": CACHE, "use_cache_list": True}}
    program = torch.export.export(model, io.example_inputs(spec, "forward", SEQ), strict=False)
    export.write_pte(to_edge({"forward": program}), path)
    return path


class AddOne(torch.nn.Module):
    def forward(self, x):
        return x + 1


def export_add_one(path, coreml=False):
    """A one-op program, not a Llama; ``coreml``: its op in a Core ML delegate (which Linux cannot run)."""
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(AddOne(), (torch.zeros(4),))
    partitioner = [CoreMLPartitioner()] if coreml else None
    export.write_pte(to_edge_transform_and_lower(program, partitioner=partitioner), path)
    return path


def write_checkpoint(folder):
    """The tiny Llama's canonical checkpoint, with a SentencePiece tokenizer (bos 1, eos 2)."""
    params = tiny_params()
    folder.mkdir(parents=True)
    canonical.write(canonical.Checkpoint(params, tiny_weights(params), "tokenizer.model", sentencepiece_model(),
                                         bos_id=1, eos_ids=[2]), folder)
    return folder


def calls(prompt_length, n_fed, seq_length=SEQ):
    """The calls [(start, n, seq_length)] of a run: the prompt in seq_length chunks, then one token each."""
    chunks = [(s, min(seq_length, prompt_length - s), seq_length) for s in range(0, prompt_length, seq_length)]
    return chunks + [(prompt_length + i, 1, 1) for i in range(n_fed)]


def run_calls(program, tokens, prompt_length):
    """Logits after each call of a run that feeds ``tokens`` (teacher-forced after the prompt)."""
    cache = KVCache(program.info, program.methods, program.rope)
    out = [feed(program, cache, tokens[s:s + n]) for s, n, _ in calls(prompt_length, 0)]
    return out + [feed(program, cache, [t]) for t in tokens[prompt_length:]]
