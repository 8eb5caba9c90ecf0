"""The decoded-folder cache: where it lives, what an entry is named, and its files (an .npy + a JSON sidecar).

An entry is keyed by the folder's candidate files (path, size, mtime), the `ReadOptions`, Pillow's version and
`CACHE_FORMAT_VERSION`. The array is written first and the sidecar last, so an entry only counts once its sidecar
exists; `augment_gan.data` decides when to read and write it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import PIL

from augment_gan.atomic import write_bytes_atomic
from augment_gan.decode import ReadOptions

if TYPE_CHECKING:
    from augment_gan.data import FolderScan, ImageSet

# Bump when the decoded pixels for the same file and options would change (resampling, colour
# handling, sidecar layout); old cache entries then simply stop matching.
CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """`$AUGMENT_GAN_CACHE`, else `$XDG_CACHE_HOME/augment-gan`, else `~/.cache/augment-gan`."""
    env = os.environ.get("AUGMENT_GAN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "augment-gan"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def cache_names(scan: FolderScan, options: ReadOptions) -> tuple[str, str]:
    """(entry stem, prefix shared by all entries of this folder + options)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", scan.root.name)[:40] or "root"
    prefix = f"{slug}-{_sha(str(scan.root))[:8]}-{_sha(options.to_dict())[:8]}"
    key = _sha({
        "version": CACHE_FORMAT_VERSION,
        "pillow": PIL.__version__,  # resampling and decoders may change between Pillow releases
        "root": str(scan.root),
        "files": [[f, s, m] for f, (s, m) in zip(scan.files, scan.stats)],
        "options": options.to_dict(),
    })
    return f"{prefix}-{key[:24]}", prefix


def read_entry(npy: Path, sidecar: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """A cache entry's pixels (a read-only memmap, uint8 N×H×W×C) and sidecar; None when it is missing or does
    not fit this format."""
    try:
        meta = json.loads(sidecar.read_text())
        images = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    n = len(meta.get("files", []))
    if meta.get("version") != CACHE_FORMAT_VERSION or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[0] != n or images.shape[3] != meta.get("channels"):
        return None
    return images, meta


def write_sidecar(dataset: ImageSet, options: ReadOptions, sidecar: Path, prefix: str) -> None:
    """Record a decoded set's metadata next to its array (already in place): the entry counts from now on."""
    meta = {
        "version": CACHE_FORMAT_VERSION,
        "root": str(dataset.root),
        "options": options.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "channels": dataset.channels,
        "layout": dataset.layout,
        "classes": dataset.classes,
        "labels": None if dataset.labels is None else dataset.labels.tolist(),
        "files": dataset.files,
        "skipped": [list(s) for s in dataset.skipped],
        "sources": [list(s) for s in dataset.sources],
        "colour": dataset.colour,
    }
    write_bytes_atomic(sidecar, json.dumps(meta).encode(), durable=False)
    # Older entries for the same folder and options are stale now (the contents changed).
    for old in sidecar.parent.glob(f"{prefix}-*"):
        if old.name not in (sidecar.name, sidecar.with_suffix(".npy").name) and ".tmp-" not in old.name:
            with contextlib.suppress(OSError):
                old.unlink()


# The decoded pixels go straight into the cache file as they arrive, so a folder of any size is decoded in
# bounded memory. The .npy header, which holds the final shape, is written last into room kept at the front.
NPY_HEADER = 128
"""Bytes before the pixels of a cache .npy: an .npy 1.0 header for any uint8 N×R×R×C fits."""


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy (format 1.0) header of a C-order uint8 array of `shape`, padded to `NPY_HEADER` bytes."""
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(int(v) for v in shape)}).encode("latin1")
    pad = NPY_HEADER - 10 - len(text) - 1
    assert pad >= 0, shape
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", NPY_HEADER - 10) + text + b" " * pad + b"\n"


class PixelFile:
    """Images appended in order to a binary file as the pixels of an .npy array N×R×R×C.

    `channels` 1 or 3, or None for "auto": one channel until the first colour image, then the images
    written so far are widened to three (gray repeated), in place.
    """

    _WIDEN_CHUNK = 4096  # images widened per read/write, so widening also runs in bounded memory

    def __init__(self, fp: BinaryIO, resolution: int, channels: int | None):
        self.fp, self.resolution, self.channels, self.n = fp, resolution, channels or 1, 0
        self.auto = channels is None
        fp.seek(NPY_HEADER)

    def append(self, pixels: np.ndarray) -> None:  # uint8 R×R×C
        if pixels.shape[2] == 3 and self.channels == 1:
            assert self.auto
            self._widen()
        if pixels.shape[2] == 1 and self.channels == 3:
            pixels = np.repeat(pixels, 3, axis=2)  # a gray image in a colour folder
        self.fp.write(memoryview(np.ascontiguousarray(pixels)).cast("B"))
        self.n += 1

    def _widen(self) -> None:
        # Last chunk first: a chunk's three-channel copy starts at or after its own one-channel start, so
        # nothing not yet read is overwritten.
        size = self.resolution * self.resolution
        self.fp.flush()
        # A file opened for writing only (the cache's temporary) is read through a second handle.
        reader = self.fp if self.fp.readable() else open(self.fp.name, "rb")
        try:
            end = self.n
            while end > 0:
                start = max(0, end - self._WIDEN_CHUNK)
                reader.seek(NPY_HEADER + start * size)
                gray = np.frombuffer(reader.read((end - start) * size), np.uint8)
                self.fp.seek(NPY_HEADER + start * size * 3)
                self.fp.write(np.repeat(gray, 3).tobytes())
                self.fp.flush()  # before the second handle reads the next (earlier) chunk
                end = start
        finally:
            if reader is not self.fp:
                reader.close()
        self.channels = 3
        self.fp.seek(NPY_HEADER + self.n * size * 3)

    def finish(self) -> tuple[int, int, int, int]:
        """Write the header; returns the array's shape."""
        shape = (self.n, self.resolution, self.resolution, self.channels)
        self.fp.truncate(NPY_HEADER + self.n * self.resolution * self.resolution * self.channels)
        self.fp.seek(0)
        self.fp.write(npy_header(shape))
        self.fp.flush()
        return shape

