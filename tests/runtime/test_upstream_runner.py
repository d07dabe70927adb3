"""Upstream ExecuTorch's runner for static-shape multifunction LLMs, run unmodified from the pinned wheel
(``executorch/examples/apple/coreml/llama/run_static_llm_multifunction.py``), drives our twin: the text it
writes is the text ``ane-build run`` writes, and ``ane-build run --lookahead`` (upstream's
``lookahead_decode`` on our verify method) writes it too, in fewer calls."""

import json
import subprocess
import sys

import pytest

from ane_build.model import io
from ane_build.runtime.generate import Generation
from ane_build.runtime.lookahead import Lookahead
from ane_build.runtime.program import PteProgram
from ane_build.runtime.sampling import Sampler
from ane_build.runtime.tokenizer import Tokenizer
from ane_build.stages import export
from tests.stages.tiny_entries import ane, build
from tests.tiny_llama import sentencepiece_model

UPSTREAM = "executorch.examples.apple.coreml.llama.run_static_llm_multifunction"
# Upstream's runner keeps fp16 caches and the one-token decode method's cache length, max_context_len - 1.
SEQ, MAX, N_NEW = 32, 128, 40
PROMPT = "the quick brown fox jumps over the lazy dog and the quick brown fox"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """twin.pte, params.json and tokenizer.model, as an export entry holds them, of an fp16 tiny model."""
    root = tmp_path_factory.mktemp("upstream")
    ane_params = ane(dtype="fp16", seq_length=SEQ, max_seq_length=MAX, decode_method=True, verify_method=True)
    entries, _ = build(root, "quantize", ane_params=ane_params, quantize_params={"linear": "none"})
    spec = io.read_spec(entries["quantize"])
    export.write_pte(export.lower_twin(export.load_programs(entries["quantize"], spec), io.constant_methods(spec)),
                     root / export.TWIN_FILE)
    io.write_params(spec, root)
    (root / "tokenizer.model").write_bytes(sentencepiece_model())
    return root


def upstream(release, *flags):
    argv = [sys.executable, "-m", UPSTREAM, "-m", "twin.pte", "-p", io.PARAMS_FILE, "-t", "tokenizer.model",
            "--prompt", PROMPT, "--max_new_tokens", str(N_NEW), "--temperature", "0", "--input_len", str(SEQ),
            "--max_context_len", str(MAX), *flags]
    return subprocess.run(argv, cwd=release, capture_output=True, text=True, timeout=300)


def generated_text(stdout, prompt=PROMPT):
    """The text upstream's runner generated: what follows the prompt it echoes, up to its closing rule,
    without the line it prints between the first token and the rest."""
    text = stdout.split("\n" + prompt, 1)[1].split("\n" + "-" * 50, 1)[0]
    return text.replace("\n[Using 'forward' (decode) method for generation]\n", "", 1)


def ours(release):
    """(ids, text) of ane-build's greedy generation, with the stop id upstream's runner uses (eos)."""
    tokenizer = Tokenizer(release / "tokenizer.model")
    program = PteProgram(release / export.TWIN_FILE)
    prompt_ids = tokenizer.encode(PROMPT, bos_id=program.info.bos_id)
    ids = list(Generation(program, prompt_ids, Sampler(0.0), N_NEW, stop_ids=(2,)))
    return prompt_ids, ids, tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)):]


def test_params_json_is_what_upstreams_model_args_read(release):
    from executorch.examples.models.llama.model_args import ModelArgs

    args = ModelArgs(**json.loads((release / io.PARAMS_FILE).read_text()))
    assert (args.n_layers, args.n_kv_heads, args.head_dim) == (2, 2, 16)


def test_upstreams_runner_writes_what_ane_build_run_writes(release):
    result = upstream(release)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Loading 'prefill' method" in result.stdout and "Falling back" not in result.stdout
    _, ids, text = ours(release)
    assert len(ids) >= 8 and generated_text(result.stdout) == text


def test_lookahead_writes_the_greedy_text_in_fewer_calls(release):
    """Past the stop token, where a random model repeats itself and lookahead has n-grams to verify."""
    program = PteProgram(release / export.TWIN_FILE)
    prompt_ids = Tokenizer(release / "tokenizer.model").encode(PROMPT, bos_id=program.info.bos_id)
    ids = list(Generation(program, prompt_ids, Sampler(0.0), N_NEW))
    lookahead = Lookahead(program)
    assert lookahead.generate(prompt_ids, N_NEW) == ids
    prefill_calls = -(-len(prompt_ids) // SEQ)
    assert lookahead.calls < prefill_calls + len(ids) - 1  # greedy: the prefill's, then one per token after the first


def test_upstreams_runner_cannot_look_ahead_with_a_one_token_decode_method(release):
    """Its --lookahead runs lookahead_decode on the decode method's manager (input_len 1), which refuses
    any n-gram setting; ``ane-build run --lookahead`` runs it on the verify method instead."""
    result = upstream(release, "--lookahead")
    assert result.returncode != 0
    assert "Lookahead decoding setting not compatible with input length. input_len = 1" in result.stderr
