"""The Core ML program of a tiny export, run through the interpreter, against its CPU twin.

The build is the default recipe in miniature (``tests/lint_builds.py``'s "list": fp16, c8w weights
with zero points, an 8-bit embedding, a prefill and a one-token forward function sharing them, a cache per
layer). Both programs are held to the bound tests/float_bounds.py derives for any correct fp16
program of these weights: each within ``allowed`` of exact arithmetic (fp32 on the weights the
eager quantized model holds), so within twice that of each other. The interpreter's rounding
model (fp32 inside each op, fp16 outputs) is such a program, whatever Core ML fused or
decomposed; a wrong weight, scale or op moves the logits by their own size (see
tests/stages/test_smoke_coreml.py for what smoke makes of that).
"""

import dataclasses

import numpy as np
import pytest
import torch

from ane_build.model import io
from ane_build.model.rewrites import DTYPES
from ane_build.programs import coreml_methods
from ane_build.runtime.coreml import CoreMLProgram, open_pte
from ane_build.runtime.kv_cache import KVCache, feed
from ane_build.runtime.program import EagerProgram, PteProgram
from ane_build.stages import export, quantize
from tests import float_bounds, lint_builds
from tests.stages.test_export import exact_model
from tests.stages.tiny_entries import later_call_inputs


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    return lint_builds.built(tmp_path_factory, "list")[0]


def outputs_and_bounds(entries, quantize_params=lint_builds.QUANTIZE):
    """{method: [(the interpreter's output, the twin's, the most either may be from exact, exact)]}
    for one later call of each method (random cache rows, half the cache open), of the export
    entry made from ``entries["rewrite"]`` quantized with ``quantize_params`` (and ``entries["calibrate"]``'s
    statistics, where the recipe has that stage)."""
    from executorch.runtime import Runtime

    spec = io.read_spec(entries["export"])
    dtype = DTYPES[spec["ane"]["dtype"]]
    exact_dtype = float_bounds.REFERENCE_DTYPES[dtype]
    eager = quantize.quantized_model(entries["rewrite"], quantize_params, entries.get("calibrate"))
    exact = exact_model(entries["rewrite"], eager, exact_dtype)
    coreml = coreml_methods.CoreMLMethods(entries["export"] / export.MODEL_FILE)
    twin = Runtime.get().load_program(entries["export"] / export.TWIN_FILE)
    out = {}
    for method, seq_length in io.methods(spec["ane"]).items():
        inputs = later_call_inputs(spec, seq_length, method=method)
        flat = io.flat_inputs(inputs)
        got = coreml.run(method, [t.numpy() for t in flat])
        twins = twin.load_method(method).execute(flat)
        wants = io.flat_inputs(eager(*inputs))
        references = io.flat_inputs(exact(*float_bounds.cast_floats(inputs, exact_dtype)))
        assert len(got) == len(twins) == len(wants) == len(references)
        out[method] = [
            (torch.from_numpy(g).reshape(r.shape), t.reshape(r.shape),
             float_bounds.allowed_distance(float_bounds.distance(w.reshape(r.shape), r), r, dtype,
                                           float_bounds.longest_reduction(spec)), r)
            for g, t, w, r in zip(got, twins, wants, references)]
    return out


def check_within_the_fp16_bound(results_by_method):
    for method, results in results_by_method.items():
        for i, (interpreted, twin, allowed, exact) in enumerate(results):  # logits, then each new k and v
            assert interpreted.dtype == torch.float16 and interpreted.shape == exact.shape
            assert float_bounds.distance(interpreted, exact) <= allowed, (method, i)
            assert float_bounds.distance(twin, exact) <= allowed, (method, i)
            assert float_bounds.distance(interpreted, twin.to(exact.dtype)) <= 2 * allowed, (method, i)


def test_the_interpreted_core_ml_program_agrees_with_the_twin_within_the_fp16_bound(entries):
    check_within_the_fp16_bound(outputs_and_bounds(entries))


def run_logits(program, info, tokens):
    """Logits [positions, vocab] of a run through the runner's KV cache: 40 tokens in prefill calls
    (a full chunk and a short remainder), then a one-token forward call per token, past the cache's window."""
    cache = KVCache(info, program.methods, program.rope)
    logits = [feed(program, cache, tokens[:40])] + [feed(program, cache, [t]) for t in tokens[40:]]
    return torch.stack([x.to(torch.float64) for x in logits])


def test_a_run_through_the_interpreter_stays_within_the_bound_at_every_call(entries):
    """The runner's calls (prefill then decode, cache rows written back, the ring wrapping): at each
    call the interpreted logits are within the bound of exact arithmetic that the eager fp16 model's
    own distance at that call gives, as are the twin's."""
    program, twin = open_pte(entries["export"] / export.MODEL_FILE), PteProgram(entries["export"] / export.TWIN_FILE)
    assert isinstance(program, CoreMLProgram) and program.info == twin.info
    assert program.methods == twin.methods == {"forward": 1, "prefill": 32}
    assert all(torch.equal(a, b) for a, b in zip(program.rope, twin.rope))
    info = program.info
    eager = quantize.quantized_model(entries["rewrite"], lint_builds.QUANTIZE)
    exact = exact_model(entries["rewrite"], eager, torch.float32)
    tokens = torch.randint(3, info.vocab_size, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    got, twins = run_logits(program, info, tokens), run_logits(twin, info, tokens)
    wants = run_logits(EagerProgram(eager, info, program.rope), info, tokens)
    # The exact model reads the same rotary rows (the program's table, widened), as any input.
    exact_info = dataclasses.replace(info, dtype="fp32")
    exacts = run_logits(EagerProgram(exact, exact_info, float_bounds.cast_floats(program.rope, torch.float32)),
                        exact_info, tokens)
    reduction = float_bounds.longest_reduction(io.read_spec(entries["export"]))
    for i, (g, t, w, r) in enumerate(zip(got, twins, wants, exacts)):
        allowed = float_bounds.allowed_distance(float_bounds.distance(w, r), r, torch.float16, reduction)
        assert float_bounds.distance(g, r) <= allowed and float_bounds.distance(t, r) <= allowed, i


def test_only_core_ml_programs_are_interpreted(entries):
    assert coreml_methods.delegates_to_coreml(entries["export"] / export.MODEL_FILE)
    assert not coreml_methods.delegates_to_coreml(entries["export"] / export.TWIN_FILE)
    assert isinstance(open_pte(entries["export"] / export.TWIN_FILE), PteProgram)


def test_the_interpreter_outputs_are_fp16_like_the_program_says(entries):
    coreml = coreml_methods.CoreMLMethods(entries["export"] / export.MODEL_FILE)
    spec = io.read_spec(entries["export"])
    out = coreml.run("forward", [t.numpy() for t in io.flat_inputs(io.example_inputs(spec, "forward", 1))])
    assert all(a.dtype == np.float16 for a in out)


def test_ane_build_run_generates_with_a_core_ml_pte_on_linux(entries, checkpoint, capsys):
    """``ane-build run -m model.pte`` where ExecuTorch has no Core ML backend: the interpreter runs it,
    and the speeds say whose they are."""
    from ane_build.cli.run import entry

    code = entry(["-m", str(entries["export"] / export.MODEL_FILE), "-t", str(checkpoint / "tokenizer.model"),
                  "--prompt", "the quick brown fox", "--temperature", "0", "--n_steps", "6"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("the quick brown fox")
    speeds = err.splitlines()[-1]
    assert speeds.startswith("prefill: ") and "tokens/s); decode: " in speeds
    assert speeds.endswith("tokens/s); the Core ML program through ane-build's reference interpreter on this CPU")
