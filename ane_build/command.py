"""How every ane-build command ends: its output, or one ``error: ...`` line and exit status 1."""

import argparse
import logging
import sys

from ane_build.errors import UserError


def run(prog, description, add_arguments, main, argv=None):
    """Parse ``argv`` with ``add_arguments``, call ``main(args)``; a UserError is one line on stderr."""
    args = add_arguments(argparse.ArgumentParser(prog=prog, description=description)).parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("ane_build").setLevel(logging.INFO)  # our own progress, not every library's chatter
    return report_errors(main, args)


def report_errors(main, args):
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
