"""What a build prints: our own progress, other libraries' warnings once each, no progress bars.

Lowering a model makes coremltools and ExecuTorch log thousands of lines (every op a pass
removes, the same notice for each of 436 weights, a progress bar per pass pipeline), which
buried the build's own progress and errors.
"""

import logging
import os


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


class OncePerMessage(logging.Filter):
    """Passes our own records, and another library's only the first time its text is seen."""

    def __init__(self):
        super().__init__()
        self._seen = set()

    def filter(self, record):
        if record.name == "ane_build" or record.name.startswith("ane_build."):
            return True
        text = (record.name, record.levelno, record.getMessage())
        if text in self._seen:
            return False
        self._seen.add(text)
        return True
