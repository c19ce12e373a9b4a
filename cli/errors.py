"""The one way a subcommand reports an error that stops it: one line on stderr, an exit code.

    subject-ffhq <command>: error: <message, whitespace folded onto one line>
"""

from __future__ import annotations

import sys

PROG = "subject-ffhq"


def fail(command: str, message: object, code: int = 2) -> int:
    """Print ``message`` as the command's one error line and return ``code`` (2: bad arguments or
    setup, nothing written; 1: the work itself failed)."""
    print(f"{PROG} {command}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return code


def note(command: str, message: object) -> None:
    """A one-line notice on stderr that is not an error (an interruption, a size)."""
    print(f"{PROG} {command}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
