"""`--quiet` and `--verbose`: what a command prints on stderr besides its results.

The library never prints: it logs warnings and progress text to `logging.getLogger("augment_gan")` and
draws tqdm bars on stderr when asked to. A command shows INFO and above by default, only errors with
`--quiet` (which also turns its progress bars off), and DEBUG too with `--verbose`. Python warnings (the
datasets', albumentations') go through the same handler, so `--quiet` silences them as well. Results go
to stdout with `click.echo` and are never filtered.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
from typing import Any, Callable, Iterator

import click

LOGGER = "augment_gan"


class _Formatter(logging.Formatter):
    """Progress text as it is; warnings and errors as `warning: ...` / `error: ...` (one line each)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            prefix = "error: " if record.levelno >= logging.ERROR else "warning: "
            if not message.lower().startswith(prefix):
                message = prefix + message
        return message


class _Handler(logging.Handler):
    """Writes to the current `sys.stderr` through tqdm, so a message never breaks a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise (logging.Handler's own rule)
            self.handleError(record)


@contextlib.contextmanager
def verbosity(*, quiet: bool = False, verbose: bool = False) -> Iterator[None]:
    """Show the `augment_gan` log at the level `quiet`/`verbose` ask for while the block runs; then restore."""
    logger = logging.getLogger(LOGGER)
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    handler = _Handler()
    handler.setFormatter(_Formatter())
    saved_level, saved_showwarning = logger.level, warnings.showwarning

    def showwarning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                    line: str | None = None) -> None:
        # One line, like the library's own warnings; the file and line of the warn() call help nobody here.
        text = str(message) if issubclass(category, UserWarning) else f"{category.__name__}: {message}"
        logger.warning(text)

    logger.setLevel(level)
    logger.addHandler(handler)
    warnings.showwarning = showwarning
    try:
        yield
    finally:
        warnings.showwarning = saved_showwarning
        logger.removeHandler(handler)
        logger.setLevel(saved_level)


def verbosity_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add `--quiet` and `--verbose` to a click command. The command still receives `quiet` (True: no
    progress bars); the log level is set around its call."""

    @click.option("--verbose", "-v", is_flag=True, help="Also print debug messages on stderr.")
    @click.option("--quiet", "-q", is_flag=True,
                  help="Print only errors and results: no progress bars, progress text or warnings.")
    @functools.wraps(function)
    def command(*args: Any, verbose: bool, **kwargs: Any) -> Any:
        if kwargs["quiet"] and verbose:
            raise click.UsageError("--quiet and --verbose contradict each other; pass one")
        with verbosity(quiet=kwargs["quiet"], verbose=verbose):
            return function(*args, **kwargs)

    return command
