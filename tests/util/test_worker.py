import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ane_build.util import worker
from ane_build.util.errors import UserError
from ane_build.util.memory import available_bytes


def add(a, b):
    return a + b


def refuse(where):
    raise UserError(where, "expected something else")


def unpicklable_failure():
    class Local(Exception):  # defined in a function: cannot be pickled back
        pass
    raise Local("deep inside")


def die(code):
    os._exit(code)


def wait_forever():
    time.sleep(600)


@pytest.mark.parametrize("start", ["spawn", "fork"])
def test_the_result_comes_back(start):
    with worker.beside(add, 2, 3, start=start) as result:
        assert result() == 5


HELD = {}  # what this process holds when it forks


def held_here():
    return HELD["tensor"].sum().item(), os.getpid()


def test_a_forked_process_reads_what_this_one_holds():
    import torch

    HELD["tensor"] = torch.arange(4.0)
    with worker.beside(held_here, start="fork") as result:
        total, pid = result()
    assert total == 6.0 and pid != os.getpid()


def test_an_exception_is_raised_again_here():
    with worker.beside(refuse, "recipe.yaml") as result, pytest.raises(UserError) as error:
        result()
    assert str(error.value) == "recipe.yaml: expected something else"


def test_an_exception_that_cannot_travel_comes_back_as_its_traceback():
    with worker.beside(unpicklable_failure) as result, pytest.raises(RuntimeError, match="Local: deep inside"):
        result()


def test_a_process_that_dies_is_an_error_not_a_hang():
    with worker.beside(die, 3) as result, pytest.raises(RuntimeError) as error:
        result()
    assert str(error.value) == "die died in its process (exit code 3) before returning"


def test_leaving_early_stops_the_process():
    started = time.time()
    with pytest.raises(KeyError), worker.beside(wait_forever):
        raise KeyError("the caller failed first")
    assert time.time() - started < 60


def test_the_process_dies_with_its_parent(tmp_path):
    """A caller killed outright (SIGKILL: no cleanup runs) leaves no worker behind."""
    script = ("import sys, time; sys.path[:0] = sys.argv[1:]\n"
              "from ane_build.util import worker; from tests.util import test_worker\n"
              "with worker.beside(test_worker.wait_forever):\n"
              "    print('started', flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, *sys.path], stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline() == "started\n"
    children = [int(pid) for pid in Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()]
    parent.kill()
    parent.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    assert children and not any(Path(f"/proc/{pid}").exists() for pid in children)


def test_user_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(UserError("a.yaml", "b")))
    assert isinstance(error, UserError) and str(error) == "a.yaml: b"


def set_jobs(monkeypatch, value):
    """``ANE_BUILD_JOBS`` set to ``value``, or unset (None)."""
    if value is None:
        monkeypatch.delenv(worker.JOBS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(worker.JOBS_VARIABLE, value)


@pytest.mark.parametrize(("value", "expected"), [(None, 2), ("2", 2), ("1", 1)])
def test_jobs_come_from_the_environment(monkeypatch, value, expected):
    set_jobs(monkeypatch, value)
    assert worker.jobs() == expected
    chosen = worker.beside_or_later(start="fork")
    if expected == 2:
        assert chosen.func is worker.beside and chosen.keywords == {"start": "fork"}
    else:
        assert chosen is worker.later


@pytest.mark.parametrize(("value", "expected"), [(None, 1), ("2", 2), ("1", 1)])
def test_unset_jobs_run_one_process_at_a_time_where_both_would_not_fit(monkeypatch, value, expected):
    set_jobs(monkeypatch, value)
    more_than_there_is = 2 * available_bytes() + 10**9
    assert worker.jobs(needs_bytes=more_than_there_is) == expected
    assert (worker.beside_or_later(needs_bytes=more_than_there_is) is worker.later) == (expected == 1)


@pytest.mark.parametrize("value", ["3", "many", ""])
def test_a_bad_jobs_setting_is_one_line(monkeypatch, value):
    monkeypatch.setenv(worker.JOBS_VARIABLE, value)
    with pytest.raises(UserError) as err:
        worker.jobs()
    assert str(err.value) == (f"ANE_BUILD_JOBS: expected 1 (one process: least memory) or 2 (a second process "
                              f"beside the first: least time), got {value!r}")
