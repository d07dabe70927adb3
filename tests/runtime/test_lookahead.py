"""What ``--lookahead`` refuses, each in one line (its text equal to greedy's is in test_upstream_runner)."""

import pytest

from ane_build.cli.run import entry
from ane_build.runtime.lookahead import Lookahead, Settings
from ane_build.runtime.program import PteProgram
from ane_build.util.errors import UserError
from tests.runtime.test_upstream_runner import release  # noqa: F401 (a fixture)


def refused(make):
    with pytest.raises(UserError) as err:
        make()
    message = str(err.value)
    assert message.startswith("--") and "\n" not in message
    return message


def test_a_program_without_a_verify_method_is_refused(twin):
    program = PteProgram(twin("list-decode"))
    assert refused(lambda: Lookahead(program)) == (
        "--lookahead: the program has no verify method (every position's logits): build it with "
        "ane.verify_method: true")


def test_settings_that_do_not_fit_a_verify_call_are_refused(release):  # noqa: F811
    program = PteProgram(release / "twin.pte")
    message = refused(lambda: Lookahead(program, Settings(ngram_size=9, window_size=4, n_verifications=4)))
    assert message == ("--lookahead: (ngram_size - 1) * (window_size + n_verifications) = 64 tokens do not fit "
                       "the verify method's 32")


def test_a_prompt_that_leaves_no_room_for_a_call_is_refused(release):  # noqa: F811
    program = PteProgram(release / "twin.pte")
    info = program.info
    message = refused(lambda: Lookahead(program).generate([5] * (info.max_seq_length - info.seq_length), 4))
    assert message == (f"--prompt: {info.max_seq_length - info.seq_length} tokens leave no room for lookahead "
                       f"calls of {info.seq_length} in a context of {info.max_seq_length}")


def test_lookahead_with_sampling_is_refused_before_anything_loads(tmp_path, capsys):
    code = entry(["-m", str(tmp_path / "missing.pte"), "--lookahead", "--temperature", "0.7"])
    err = capsys.readouterr().err
    assert code != 0 and err.strip() == "error: --lookahead: decodes greedily: pass --temperature 0 (got 0.7)"
