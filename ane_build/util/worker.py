"""Run one function in a second Python process while this one works (two lowerings, two cores),
or, where memory is short, ``later`` in this one.

The process is spawned: it starts clean instead of inheriting torch's thread pools mid-use;
or, for a function of what this process already holds (a model in memory), forked: it starts
as a copy, sharing that memory until written, and runs torch on one thread (GNU OpenMP's pool
does not survive a fork). Its result or exception comes back through a pipe; if it dies
without one (killed, out of memory) the caller gets an error saying so instead of waiting
forever.
"""

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import traceback

from ane_build.util import logs
from ane_build.util.memory import available_bytes

PR_SET_PDEATHSIG = 1  # <sys/prctl.h>
JOBS_VARIABLE = "ANE_BUILD_JOBS"
log = logging.getLogger(__name__)


def jobs(needs_bytes=0):
    """How many processes a stage may run at once, from ``ANE_BUILD_JOBS`` (a machine's choice,
    not a recipe's: the files written are the same). 2: a second process beside the first, least
    time. 1: one after the other in this process, least memory (SmolLM2-135M's export peaks at
    1.35 GB that way instead of 2.2-2.4 GB for both processes). Unset: 2, unless both processes
    would need more than the memory available now (``needs_bytes``, the caller's estimate)."""
    from ane_build.util.errors import UserError

    value = os.environ.get(JOBS_VARIABLE)
    if value is None:
        available = available_bytes()
        if needs_bytes > available:
            log.info("one process at a time: both would need ~%.1f GB, %.1f GB available (%s=2 runs both anyway)",
                     needs_bytes / 1e9, available / 1e9, JOBS_VARIABLE)
            return 1
        return 2
    if value not in ("1", "2"):
        raise UserError(JOBS_VARIABLE, f"expected 1 (one process: least memory) or 2 (a second process "
                                       f"beside the first: least time), got {value!r}")
    return int(value)


def beside_or_later(start="spawn", needs_bytes=0):
    """``beside`` (its processes started by ``start``) or ``later``, as ``jobs(needs_bytes)`` says."""
    return functools.partial(beside, start=start) if jobs(needs_bytes) == 2 else later


@contextlib.contextmanager
def beside(function, *args, start="spawn"):
    """Start ``function(*args)`` in a second process, spawned or forked (``start``); yields
    ``result()``, which waits for its return value (or raises its exception). Leaving the block
    stops the process if still running."""
    context = multiprocessing.get_context(start)
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run, args=(send, os.getpid(), function, args, start), daemon=True)
    process.start()
    send.close()  # the child holds the only sending end: its death ends the pipe

    def result():
        try:
            status, value = receive.recv()
        except EOFError:
            process.join()
            raise RuntimeError(f"{function.__name__} died in its process (exit code {process.exitcode}) "
                               "before returning") from None
        if status == "error":
            raise value
        return value

    try:
        yield result
    finally:
        if process.is_alive():
            process.terminate()
        process.join()
        receive.close()


@contextlib.contextmanager
def later(function, *args):
    """``beside``'s interface in this process: ``result()`` runs ``function(*args)`` when called."""
    yield lambda: function(*args)


def _run(send, parent, function, args, start):
    _die_with(parent)
    if start == "fork":
        import torch

        torch.set_num_threads(1)
    else:
        logs.show_progress()  # a spawned process starts without its parent's logging set up
    try:
        outcome = ("ok", function(*args))
    except BaseException as error:  # noqa: BLE001 - every failure is the caller's to report
        outcome = ("error", _picklable(error))
    send.send(outcome)
    send.close()


def _die_with(parent):
    """Be killed when ``parent`` dies, even by a signal that runs none of its cleanup (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def _picklable(error):
    """``error`` itself when it pickles, else a RuntimeError carrying its traceback text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError("".join(traceback.format_exception(error)).rstrip())
