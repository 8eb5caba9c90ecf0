"""What keeps a run directory safe while `fit` runs: an exclusive lock, and signals turned into a flag."""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from augment_gan.errors import UserError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on RUN/.lock for the lifetime of a fit; a second fit on the same run fails fast.

    `filelock` (installed with torch) uses flock on POSIX and msvcrt on Windows, so the lock works, and the
    package imports, on every platform.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{run_dir} is in use by another running `augment-gan fit` "
                        f"(lock: {run_dir / LOCK_NAME})") from None
    try:
        yield
    finally:
        lock.release()


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked at step boundaries, so a checkpoint is never half a step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
