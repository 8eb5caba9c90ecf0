"""User-facing errors: bad input that the CLI reports as one line, without a traceback."""


class UserError(Exception):
    """Misuse or bad input the user can fix (missing folder, bad option, corrupt checkpoint).

    The CLI prints ``Error: <message>`` on stderr and exits with status 1. Library callers get an
    ordinary exception with the same one-line message.
    """
