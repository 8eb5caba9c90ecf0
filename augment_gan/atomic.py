"""Atomic file writes: a temporary file `<name>.tmp-<pid>` in the destination's folder, then a rename.

Readers (and a killed process) never leave or see a partial file: the destination holds either its old
contents or the new ones. `write_bytes_atomic` is the general form (optionally durable); `write_atomic` is
the per-image fast path synth and vary use for thousands of small files.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, *, durable: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file for binary writing; on success it replaces `path`, on error it is removed.

    `durable` fsyncs before the rename (checkpoints, manifests); thousands of small images skip it.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _name_destination(exc, tmp, path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _name_destination(exc: OSError, tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """An error about the temporary file names the file the user knows (the temporary is gone)."""
    if exc.filename is None or os.fspath(exc.filename) == os.fspath(tmp):
        exc.filename, exc.filename2 = os.fspath(path), None


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` atomically."""
    with open_atomic(path, durable=durable) as f:
        f.write(data)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
DIR_FDS = hasattr(os, "O_DIRECTORY") and {os.open, os.rename, os.unlink} <= os.supports_dir_fd
"""Folder descriptors work for name-relative open/rename (POSIX); elsewhere every call takes the full path."""


def write_atomic(path: str | os.PathLike, data: bytes, dir_fd: int | None = None) -> None:
    """Write one image file through `<name>.tmp-<pid>` in the same folder and a rename.

    The per-image fast path of `write_bytes_atomic(durable=False)`: plain os calls, no Path or file objects
    and no unlink probe cost 35 instead of 123 us of CPU per file (tmpfs, measured), about 9% of generating
    a 32px image. With `dir_fd` (an open descriptor of the folder, when `DIR_FDS`) `path` is a bare file
    name, so the kernel does not walk the whole path again for the open and the rename. No fsync: this
    protects against a killed process (the case resume handles), not against power loss; manifests and
    settings files are written durably.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, _CREATE, 0o644, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            _name_destination(exc, tmp, path)
        raise
