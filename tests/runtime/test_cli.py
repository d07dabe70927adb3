import shutil
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
        "no rotary table": (["-m", bare_pte, "-t", checkpoint / "tokenizer.model"],
                            f"{bare_pte}: has no freqs_cos or freqs_sin constant method (its rotary table)"),
        "vocab": (["-m", twin("list-decode"), "-t", tiktoken],
                  f"{tiktoken}: 518 tokens, more than twin.pte's vocab_size 320"),
        "long prompt": ([*model, "--prompt", "the cat " * 40], "--prompt: "),
        "top_p 0": ([*model, "--top_p", "0"], "--top_p: expected a probability in (0, 1]; got 0.0"),
        "top_p 1.5": ([*model, "--top_p", "1.5"], "--top_p: expected a probability in (0, 1]; got 1.5"),
        "no model": ([], "-m/--model: required"),
        "eager without shapes": (["--use_eager", "-c", checkpoint], "--use_eager: needs --seq_length"),
    }


@pytest.mark.parametrize("case", ["not a pte", "no rotary table", "vocab", "long prompt", "top_p 0", "top_p 1.5",
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


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_checkpoint(checkpoint, tmp_path_factory):
    """The tiny checkpoint with a chat template beside its tokenizer, as a chat model's entries keep it."""
    folder = tmp_path_factory.mktemp("chat") / "tiny"
    shutil.copytree(checkpoint, folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


def test_chat_prints_the_reply_to_the_users_message(twin, chat_checkpoint, capsys):
    tokenizer = Tokenizer(chat_checkpoint / "tokenizer.model")
    prompt_ids = tokenizer.chat_ids(f"<s>user: {PROMPT}</s>\nassistant:")
    assert prompt_ids[0] == 1 and prompt_ids.count(1) == 1 and 2 in prompt_ids  # bos once, </s> as its id
    program = open_eager(chat_checkpoint, seq_length=SEQ, max_seq_length=MAX, cache_size=CACHE)
    generated = list(Generation(program, prompt_ids, Sampler(0.0), n_steps=12, stop_ids=(2,)))
    reply = tokenizer.decode(prompt_ids + generated)[len(tokenizer.decode(prompt_ids)):]
    twin_flags = ["-m", twin("list-decode"), "-t", chat_checkpoint / "tokenizer.model"]
    for argv in (["--use_eager", "-c", chat_checkpoint, *SHAPES], twin_flags,
                 [*twin_flags, "--chat_template", chat_checkpoint / "chat_template.jinja"]):
        code, out, err = run([*argv, *GREEDY, "--chat"], capsys)
        assert (code, out) == (0, reply + "\n")
        assert f"prefill: {len(prompt_ids)} tokens in " in err


@pytest.mark.parametrize("case", ["no template", "template without chat", "missing template file"])
def test_chat_errors_are_one_line(twin, checkpoint, tmp_path, capsys, case):
    model = ["-m", twin("list-decode"), "-t", checkpoint / "tokenizer.model", *GREEDY]
    argv, expected = {
        "no template": ([*model, "--chat"], f"--chat: no chat template: expected {checkpoint / 'chat_template.jinja'} "
                                            "beside the tokenizer (a chat model's entries and release bundles keep it "
                                            "there), or --chat_template PATH"),
        "template without chat": ([*model, "--chat_template", tmp_path / "t.jinja"],
                                  "--chat_template: applies with --chat only"),
        "missing template file": ([*model, "--chat", "--chat_template", tmp_path / "t.jinja"],
                                  f"{tmp_path / 't.jinja'}: no such chat template file"),
    }[case]
    code, _, err = run(argv, capsys)
    assert code == 1 and "Traceback" not in err and err.splitlines()[-1] == f"error: {expected}"
