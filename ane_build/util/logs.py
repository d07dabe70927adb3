"""What a build prints: one line as each stage starts and ends, warnings once each, no progress bars.

Lowering a model makes coremltools and ExecuTorch print thousands of lines (every op a pass
removes, the same notice for each of 436 weights, a progress bar per pass pipeline, native
code's own notes straight to the file descriptors), which buried the build's own progress
and errors. So a stage's whole output, ours, the libraries' and native code's, goes to a
log file of its own (``stage_output``). The console keeps our warnings (about the user's
recipe, checkpoint or cache) and another library's errors, the first time their text is seen.
A library's warnings stay in the log: they are notices about the library itself (a torch
version it was not tested with, optional native parts it could not load here) that a build's
user cannot act on.
"""

import contextlib
import logging
import os
import sys
import threading
import time
import warnings


def show_progress():
    """Log ``ane_build``'s INFO progress to stderr; from other libraries only warnings, each once."""
    # tqdm reads its defaults from the environment when first imported (coremltools imports it
    # with the first conversion); its per-pass bars say nothing a build's user acts on.
    os.environ.setdefault("TQDM_DISABLE", "1")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(OncePerMessage())
        root.addHandler(handler)
    logging.getLogger("ane_build").setLevel(logging.INFO)
    logging.captureWarnings(True)  # Python warnings too, once each (a spawned worker repeats them)
    warnings.formatwarning = one_line_warning


def one_line_warning(message, category, filename, lineno, line=None):
    """A Python warning as one line (the default adds the source line and a blank one)."""
    return f"{category.__name__}: {message} ({filename}:{lineno})"


def is_ours(record):
    return record.name == "ane_build" or record.name.startswith("ane_build.")


class OncePerMessage(logging.Filter):
    """Passes our own records, and another library's at ``library_level`` or above only the first
    time its text is seen."""

    def __init__(self, library_level=logging.NOTSET):
        super().__init__()
        self._seen = set()
        self.library_level = library_level

    def filter(self, record):
        if is_ours(record):
            return True
        if record.levelno < self.library_level:
            return False
        text = (record.name, record.levelno, record.getMessage())
        if text in self._seen:
            return False
        self._seen.add(text)
        return True


# One for the whole build: a library's error seen in one stage is not repeated in the next.
_CONSOLE_ONCE = OncePerMessage(library_level=logging.ERROR)


@contextlib.contextmanager
def stage_output(log_path, title, expected_seconds=None):
    """Send everything printed inside (file descriptors 1 and 2, so native code and worker
    processes too) to ``log_path``; our warnings and a library's errors also to the console. On a
    terminal, a progress bar for ``title`` once the stage has run a few seconds."""
    show_progress()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(2), "w", buffering=1)
    handler = logging.StreamHandler(console)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_CONSOLE_ONCE)
    bar = ProgressBar(console, title, expected_seconds) if console.isatty() else None
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        logging.getLogger().addHandler(handler)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            if bar:
                bar.stop()
            logging.getLogger().removeHandler(handler)
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            console.close()


class ProgressBar:
    """``title [#####.....] 42 s of ~84 s`` redrawn in place, from 3 s on, until ``stop``.

    The stage cannot say how far it is; ``expected`` is how long its last build took (None:
    only the elapsed time is shown)."""

    DELAY, WIDTH = 3.0, 24

    def __init__(self, console, title, expected):
        self.console, self.title, self.expected = console, title, expected
        self.started, self._done = time.monotonic(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def line(self, elapsed):
        if not self.expected:
            return f"{self.title}  {elapsed:.0f} s"
        filled = min(self.WIDTH, int(self.WIDTH * elapsed / self.expected))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        return f"{self.title}  [{bar}]  {elapsed:.0f} s of ~{self.expected:.0f} s"

    def _run(self):
        if self._done.wait(self.DELAY):
            return
        while True:
            self.console.write("\r\033[K" + self.line(time.monotonic() - self.started))
            if self._done.wait(1.0):
                return

    def stop(self):
        self._done.set()
        self._thread.join()
        if time.monotonic() - self.started > self.DELAY:
            self.console.write("\r\033[K")
