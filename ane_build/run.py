"""``python -m ane_build.run``: the runner as a command of its own (``ane-build run`` is the same).

A mistake in the flags or files ends in one line, ``error: ...``, on stderr and exit status 1.
"""

import argparse
import logging
import sys

from ane_build.errors import UserError
from ane_build.runtime.cli import __doc__ as description
from ane_build.runtime.cli import add_arguments, main

__all__ = ["add_arguments", "main", "entry"]


def entry(argv=None):
    parser = add_arguments(argparse.ArgumentParser(prog="python -m ane_build.run", description=description))
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    # Our own progress, not every library's chatter.
    logging.getLogger("ane_build").setLevel(logging.INFO)
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(entry())
