"""``python -m ane_build.cli.run``: the runner as a command of its own (``ane-build run`` is the same).

A mistake in the flags or files ends in one line, ``error: ...``, on stderr and exit status 1.
"""

import sys

from ane_build.runtime.cli import __doc__ as description
from ane_build.runtime.cli import add_arguments, main
from ane_build.util import command

__all__ = ["add_arguments", "main", "entry"]


def entry(argv=None):
    return command.run("python -m ane_build.cli.run", description, add_arguments, main, argv)


if __name__ == "__main__":
    sys.exit(entry())
