"""The one exception type for mistakes a user can fix (recipes, paths, checkpoints, flags)."""

import os


class UserError(Exception):
    """Reported as a single line (no traceback) and a non-zero exit.

    The message names where the problem is (file and key) and what was expected.
    """

    def __init__(self, where, message):
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self):
        # Rebuilt from the whole message, so it survives being sent from another process.
        return type(self), ("", str(self))


def display_path(path):
    """A path as messages name it: relative to the working folder when it can be."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
