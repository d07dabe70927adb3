import subprocess
import sys

import pytest

from ane_build.cli.run import entry
from ane_build.runtime.generate import Generation
from ane_build.runtime.program import open_eager
from ane_build.runtime.sampling import Sampler
from ane_build.runtime.tokenizer import Tokenizer
from tests.runtime.tiny_programs import CACHE, MAX, SEQ
from tests.tiny_llama import write_tokenizer

PROMPT = "the quick brown fox"
GREEDY = ["--prompt", PROMPT, "--temperature", "0", "--n_steps", "12"]
SHAPES = ["--seq_length", str(SEQ), "--max_seq_length", str(MAX), "--cache_size", str(CACHE)]


def run(argv, capsys):
    code = entry([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def expected(checkpoint):
    """(what greedy generation prints: the prompt, then the text of 12 tokens the eager model picks;
    the prompt's token count)."""
    tokenizer = Tokenizer(checkpoint / "tokenizer.model")
    prompt_ids = tokenizer.encode(PROMPT, bos_id=1)
    program = open_eager(checkpoint, seq_length=SEQ, max_seq_length=MAX, cache_size=CACHE)
    generated = list(Generation(program, prompt_ids, Sampler(0.0), n_steps=12, stop_ids=(2, 3)))
    text = tokenizer.decode(prompt_ids + generated)[len(tokenizer.decode(prompt_ids)):]
    return PROMPT + text + "\n", len(prompt_ids)


def test_the_twin_streams_what_the_eager_model_generates(twin, checkpoint, expected, capsys):
    text, n_prompt = expected
    code, out, err = run(["-m", twin("list-decode"), "-t", checkpoint / "tokenizer.model", *GREEDY], capsys)
    assert (code, out) == (0, text)
    assert err.splitlines()[-1].startswith(f"prefill: {n_prompt} tokens in ")
    assert "tokens/s); decode: 11 tokens in " in err


def test_use_eager_runs_the_checkpoint(checkpoint, expected, capsys):
    code, out, _ = run(["--use_eager", "-c", checkpoint, *SHAPES, *GREEDY], capsys)
    assert (code, out) == (0, expected[0])


def error_cases(twin, bare_pte, checkpoint, tmp_path):
    """case -> (argv, how the error line starts)."""
    not_a_pte = tmp_path / "model.pte"
    not_a_pte.write_bytes(b"not a program")
    (tmp_path / "tiktoken").mkdir()
    tiktoken = write_tokenizer(tmp_path / "tiktoken", "tiktoken")
    model = ["-m", twin("list-decode"), "-t", checkpoint / "tokenizer.model"]
    return {
        "not a pte": (["-m", not_a_pte], f"{not_a_pte}: not an ExecuTorch program (.pte) ("),
        "no metadata": (["-m", bare_pte, "-t", checkpoint / "tokenizer.model"],
                        f"{bare_pte}: has no runner metadata"),
        "vocab": (["-m", twin("list-decode"), "-t", tiktoken],
                  f"{tiktoken}: 518 tokens, more than twin.pte's vocab_size 320"),
        "long prompt": ([*model, "--prompt", "the cat " * 40], "--prompt: "),
        "top_p 0": ([*model, "--top_p", "0"], "--top_p: expected a probability in (0, 1]; got 0.0"),
        "top_p 1.5": ([*model, "--top_p", "1.5"], "--top_p: expected a probability in (0, 1]; got 1.5"),
        "no model": ([], "-m/--model: required"),
        "eager without shapes": (["--use_eager", "-c", checkpoint], "--use_eager: needs --seq_length"),
    }


@pytest.mark.parametrize("case", ["not a pte", "no metadata", "vocab", "long prompt", "top_p 0", "top_p 1.5",
                                  "no model", "eager without shapes"])
def test_user_errors_are_one_line(twin, bare_pte, checkpoint, tmp_path, capsys, case):
    argv, start = error_cases(twin, bare_pte, checkpoint, tmp_path)[case]
    code, out, err = run(argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: {start}")
    if case == "long prompt":
        assert errors[0].endswith(f"leave no room to generate in a context of max_seq_length={MAX} tokens")


def test_python_dash_m_reports_user_errors():
    done = subprocess.run([sys.executable, "-m", "ane_build.cli.run", "--top_p", "1.5"], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.endswith("error: --top_p: expected a probability in (0, 1]; got 1.5\n")
