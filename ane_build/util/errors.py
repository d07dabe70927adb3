"""The one exception type for mistakes a user can fix (recipes, paths, checkpoints, flags)."""

import os


class UserError(Exception):
    """Reported as a single line (no traceback) and a non-zero exit.

    The message names where the problem is (file and key) and what was expected.
    """

    def __init__(self, where, message):
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, where):
        """The same error (its type and attributes kept), its message prefixed with ``where``."""
        located = type(self).__new__(type(self))  # not copy.copy: that goes through __reduce__
        located.__dict__.update(self.__dict__)
        located.args = (f"{where}: {self}",)
        return located

    def __reduce__(self):
        # Rebuilt from the whole message, so it survives being sent from another process.
        return type(self), ("", str(self))


def display_path(path):
    """A path as messages name it: relative to the working folder when it can be."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


class SourceMissing(UserError):
    """A local source that is not there (yet): a recipe whose checkpoint the user brings.

    Commands over every recipe skip such a recipe in one line instead of failing; asked for
    by name, it fails like any other UserError.
    """

    def __init__(self, where, path):
        super().__init__(where, f"{path} does not exist")
        self.path = path

    def __reduce__(self):
        return UserError, ("", str(self))  # across processes, the message is what matters
