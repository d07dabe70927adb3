"""How every ane-build command ends: its output, or one ``error: ...`` line and exit status 1."""

import argparse
import sys

from ane_build.util import logs
from ane_build.util.errors import UserError


def run(prog, description, add_arguments, main, argv=None):
    """Parse ``argv`` with ``add_arguments``, call ``main(args)``; a UserError is one line on stderr."""
    args = add_arguments(argparse.ArgumentParser(prog=prog, description=description)).parse_args(argv)
    logs.show_progress()
    return report_errors(main, args)


def report_errors(main, args):
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
