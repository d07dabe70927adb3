import pytest
import torch

from ane_build.runtime import program as program_module
from ane_build.runtime.generate import Generation
from ane_build.runtime.program import ModelInfo, PteProgram, open_eager
from ane_build.runtime.sampling import Sampler
from ane_build.util.errors import UserError
from tests import float_bounds
from tests.model.test_ane_llama import masked_reference, tokens_for, windowed
from tests.runtime.tiny_programs import CACHE, MAX, SEQ, TWINS, calls, export_add_one, run_calls
from tests.tiny_llama import tiny_params, tiny_weights

PROMPT = tokens_for(tiny_params(), 20)  # three calls: 8 + 8 + 4 tokens


def greedy(program):
    return list(Generation(program, PROMPT, Sampler(0.0)))


def test_the_twin_states_what_the_runner_needs(twin):
    program = PteProgram(twin("list-decode"))
    assert program.info == ModelInfo(seq_length=SEQ, max_seq_length=MAX, cache_size=CACHE, n_layers=2, n_kv_heads=2,
                                     head_dim=16, dtype="fp32", vocab_size=320, use_cache_list=True, bos_id=1,
                                     eos_ids=(2, 3))
    assert program.methods == {"forward": 1, "prefill": SEQ}
    cos, sin = program.rope
    assert cos.shape == sin.shape == (MAX, 8) and cos.dtype == torch.float32


@pytest.mark.parametrize("name", TWINS)
def test_twin_generation_past_the_window_matches_the_windowed_reference(twin, name):
    program = PteProgram(twin(name))
    generated = greedy(program)
    tokens = PROMPT + generated
    assert len(tokens) == MAX > 3 * CACHE
    params = tiny_params()
    run = calls(len(PROMPT), len(generated) - 1)
    expected = masked_reference(params, tiny_weights(params), tokens[:-1], windowed(run, CACHE)).float()
    # Each generated token is the reference's argmax where it was made, chunked prefill's first one too...
    assert [int(expected[s + n - 1].argmax()) for s, n, _ in run[2:]] == generated
    # ... and the logits agree throughout, teacher-forced.
    for (start, n, _), logits in zip(run, run_calls(program, tokens[:-1], len(PROMPT))):
        torch.testing.assert_close(logits, expected[start + n - 1], atol=float_bounds.TINY_FP32_ATOL, rtol=0)


def test_the_decode_method_is_used_and_agrees_with_prefill_only(twin):
    program = PteProgram(twin("list-decode"))
    used, run = [], program.run
    program.run = lambda method, call: used.append(method) or run(method, call)
    with_decode = greedy(program)
    assert used == ["prefill"] * 3 + ["forward"] * (len(with_decode) - 1)
    used.clear()
    program.methods = {"prefill": SEQ}
    assert greedy(program) == with_decode
    assert used == ["prefill"] * (3 + len(with_decode) - 1)


def test_the_eager_model_generates_what_the_twin_does(twin, checkpoint):
    eager = open_eager(checkpoint, seq_length=SEQ, max_seq_length=MAX, cache_size=CACHE)
    assert greedy(eager) == greedy(PteProgram(twin("list-decode")))


def test_a_program_without_its_rotary_table_is_refused(bare_pte):
    with pytest.raises(UserError) as err:
        PteProgram(bare_pte)
    assert str(err.value) == (f"{bare_pte}: has no freqs_cos or freqs_sin constant method (its rotary table): "
                              "not a program of this ane-build; export it again")


@pytest.mark.parametrize("flag, value", [("seq_length", 16), ("cache_size", 4), ("dtype", "fp16")])
def test_a_flag_that_contradicts_the_program_is_refused(twin, flag, value):
    with pytest.raises(UserError) as err:
        PteProgram(twin("list-decode"), **{flag: value})
    assert str(err.value).startswith(f"--{flag}: {value!r} contradicts twin.pte, which has {flag}=")


def test_constant_methods_that_contradict_the_inputs_are_refused(tmp_path):
    with pytest.raises(UserError) as err:
        program_module._model_info(tmp_path / "odd.pte", {"seq_length": 8}, {"seq_length": 16}, {})
    message = f"{tmp_path / 'odd.pte'}: constant method seq_length returns 16, but forward's inputs say 8"
    assert str(err.value) == message


def test_a_core_ml_program_says_to_run_its_twin(coreml_pte):
    """ExecuTorch's Linux runtime has no Core ML backend."""
    with pytest.raises(UserError) as err:
        PteProgram(coreml_pte)
    message = str(err.value)
    assert message.startswith(f"{coreml_pte}: method forward does not load (") and "\n" not in message
    assert "XnnpackBackend" in message and message.endswith("elsewhere run its CPU twin, twin.pte")


def test_a_program_that_is_not_a_llama_is_refused(tmp_path):
    path = export_add_one(tmp_path / "add_one.pte")
    with pytest.raises(UserError) as err:
        PteProgram(path)
    assert str(err.value) == (f"{path}: forward takes inputs of shapes [(4,)]; expected an ane-build Llama's "
                              "(tokens, mask, freqs_cos, freqs_sin, k caches, v caches, last_valid_token_pos)")


@pytest.mark.parametrize("content", [b"", b"not a program", b"x" * 200])
def test_a_file_that_is_not_a_pte_is_refused(tmp_path, content):
    path = tmp_path / "model.pte"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        PteProgram(path)
    assert str(err.value).startswith(f"{path}: not an ExecuTorch program (.pte)") and "\n" not in str(err.value)


def test_a_missing_pte_is_refused(tmp_path):
    with pytest.raises(UserError, match="model.pte: no such file$"):
        PteProgram(tmp_path / "model.pte")
