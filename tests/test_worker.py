import os
import pickle
import time

import pytest

from ane_build import worker
from ane_build.errors import UserError


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


def test_the_result_comes_back():
    with worker.beside(add, 2, 3) as result:
        assert result() == 5


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


def test_user_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(UserError("a.yaml", "b")))
    assert isinstance(error, UserError) and str(error) == "a.yaml: b"
