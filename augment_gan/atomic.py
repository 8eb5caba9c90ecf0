"""Atomic file writes: a temporary file in the destination's folder, then a rename.

Readers (and a killed process) never leave or see a partial file: the destination holds either its old
contents or the new ones.
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
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` atomically."""
    with open_atomic(path, durable=durable) as f:
        f.write(data)
