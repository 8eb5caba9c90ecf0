"""User-facing errors: bad input that the CLI reports as one line, without a traceback."""
from __future__ import annotations

import errno
import os


class UserError(Exception):
    """Misuse or bad input the user can fix (missing folder, bad option, corrupt checkpoint).

    The CLI prints ``Error: <message>`` on stderr and exits with status 1. Library callers get an
    ordinary exception with the same one-line message.
    """


def os_error_message(exc: OSError) -> str:
    """One line naming the path(s) and the cause of an operating-system error (the CLI's, and the library's
    when it wraps one, e.g. a checkpoint that could not be written)."""
    cause = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__)
    if exc.errno == errno.ENOSPC:
        cause += " (the disk is full)"
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {cause}" if paths else cause
