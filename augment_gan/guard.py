"""What keeps a folder safe while a command writes it: an exclusive lock on a run directory (`fit`), locks
on an output folder (`synth`, `vary`, `merge`), and signals turned into a flag."""
from __future__ import annotations

import contextlib
import re
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from augment_gan.errors import UserError
from augment_gan.outputs import missing_folders

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


def _held(path: Path) -> bool:
    """Is the lock file `path` held by another process (or another lock object)?"""
    probe = FileLock(str(path), timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


@contextlib.contextmanager
def output_lock(out: Path, command: str, shard: tuple[int, int] = (0, 1), exclusive: bool = False) -> Iterator[None]:
    """Lock the output folder `out` of `command` (synth, vary, merge) while it writes there.

    A second process of the same command and shard is refused with a one-line `UserError`: two of them
    would write the same files and remove each other's temporaries. Shards of one sharded synth (the same N,
    different K) share a folder by design; any other pair is refused, and so is a run with `exclusive`
    (--overwrite, which deletes files) next to any other. Each process first takes its own lock
    (`.<command>-K-of-N.lock`, plus `.<command>.lock` when exclusive), then probes the locks it must not run
    beside, so of two that start together at least one sees the other. Creates `out` (and removes it again
    when the command fails before writing anything into it). Lock files stay: deleting a lock file while
    another process may open it would let two processes hold "the" lock.
    """
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; give the real folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    created = missing_folders(out)  # removed again, with the parents it needed, when the command fails early
    out.mkdir(parents=True, exist_ok=True)
    k, n = shard
    mine = [out / f".{command}-{k}-of-{n}.lock"] + ([out / f".{command}.lock"] if exclusive else [])
    held: list[FileLock] = []
    try:
        for path in mine:
            lock = FileLock(str(path), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise UserError(f"{out} is in use by another running `augment-gan {command}` (lock: {path})") from None
            held.append(lock)
        pattern = re.compile(rf"^\.{re.escape(command)}(?:-(\d+)-of-(\d+))?\.lock$")
        for path in sorted(out.iterdir()):
            match = pattern.match(path.name)
            if not match or path in mine:
                continue
            other_n = int(match.group(2)) if match.group(2) else None   # None: the exclusive marker
            if (exclusive or other_n != n) and _held(path):
                raise UserError(f"{out} is in use by another running `augment-gan {command}` (lock: {path}); "
                                "only shards of one --shard K/N set may write a folder together")
        yield
    except BaseException:
        if created and all(p in mine for p in out.iterdir()):  # nothing but our lock: leave no folder behind
            for lock in reversed(held):
                lock.release()
            held = []
            for path in mine:
                path.unlink(missing_ok=True)
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    finally:
        for lock in reversed(held):
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
