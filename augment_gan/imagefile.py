"""Image files: the output formats, their encoders (a fast minimal PNG writer) and a pool that encodes and
writes them atomically next to the generator.

`FORMATS` is the one list of image formats synth and vary write, `SYNTH_FORMATS` adds synth's tar shards; the
CLI builds its `--format` choices from them.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import math
import os
import struct
import zlib
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from augment_gan.atomic import DIR_FDS, write_atomic
from augment_gan.errors import UserError
from augment_gan.tarshards import TAR_FORMAT

FORMATS = ("png", "jpg", "webp")
SYNTH_FORMATS = (*FORMATS, TAR_FORMAT)
"""What `synth --format` takes: an image format (one file per image), or "tar" (PNGs in tar shards,
`augment_gan.tarshards`)."""
DEFAULT_QUALITY = {"png": None, "jpg": 95, "webp": 90}
# PNG's deflate stream. Encoding competes with G for the same cores, so the fastest good compressor wins:
# ISA-L (the `isal` package, a dependency) at its level 0 takes about a tenth of zlib level 1's CPU on
# 32-64px MNIST/emoji images, for files about 1.3x as large (no compression at all: 2-5x).
# `python benchmarks/bench_synth.py --codecs-only` measures it. Where isal cannot be imported, zlib level 1
# is used; files are byte-identical for a given compressor.
try:
    from isal import isal_zlib as _deflate

    PNG_COMPRESS_LEVEL = 0
except ImportError:  # pragma: no cover - isal has wheels for Linux, macOS and Windows
    _deflate = zlib
    PNG_COMPRESS_LEVEL = 1
PNG_COMPRESSOR = f"{_deflate.__name__.rsplit('.', 1)[-1]} level {PNG_COMPRESS_LEVEL}"


def default_workers(device_type: str = "cpu") -> int:
    """Encoder threads: on a CPU device one per 8 cores (encoding a PNG costs ~5-15% of generating it, see
    benchmarks/bench_synth.py); with a GPU generating, every core but one."""
    cores = os.cpu_count() or 2
    return max(1, cores // 8) if device_type == "cpu" else max(1, cores - 1)


# ----------------------------------------------------------------------------------------------------
# Encoding.

def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = _png_chunk(b"IEND", b"")
_IDAT_CRC = zlib.crc32(b"IDAT")


def png_scanlines(images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×C (C = 1 or 3) -> N×H×(1 + W·C): each row prefixed by its filter type 0, the bytes a
    PNG's IDAT deflates."""
    n, h, w, c = images.shape
    if images.dtype != np.uint8 or c not in (1, 3):
        raise ValueError(f"PNG images must be uint8 N×H×W×1 or N×H×W×3, got {images.dtype} {images.shape}")
    raw = np.zeros((n, h, 1 + w * c), np.uint8)  # each scanline starts with its filter type, 0 = none
    raw[:, :, 1:] = images.reshape(n, h, w * c)
    return raw


def png_files(images: np.ndarray) -> list[bytes]:
    """uint8 N×H×W×C (C = 1: grayscale, 3: RGB) -> one lossless 8-bit PNG file per image.

    A minimal writer (IHDR, one IDAT with scanline filter 0 deflated by `PNG_COMPRESSOR`, IEND) instead of
    Pillow's: on 32-64px images Pillow's per-file overhead cost ~3x the CPU of this writer with zlib (150 vs
    50 us at 32px, 335 vs 130 us at 64px RGB, MNIST/emoji) for files of about the same size; on 2 cores it is
    CPU taken from the generator. Scanlines of the whole batch are laid out at once; any PNG reader decodes
    the result, and the bytes depend only on the pixels and the compressor.
    """
    n, h, w, c = images.shape
    raw = png_scanlines(images)
    head = _PNG_SIGNATURE + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0))
    files = []
    for k in range(n):
        data = _deflate.compress(raw[k], PNG_COMPRESS_LEVEL)
        files.append(b"".join((head, struct.pack(">I", len(data)), b"IDAT", data,
                               struct.pack(">I", zlib.crc32(data, _IDAT_CRC)), _PNG_END)))
    return files


def png_bytes(array: np.ndarray) -> bytes:
    """uint8 H×W×C -> one PNG file (see `png_files`)."""
    return png_files(array[None])[0]


def encode_image(array: np.ndarray, fmt: str, quality: int | None = None) -> bytes:
    """uint8 H×W×C (C = 1 or 3) -> file bytes. Deterministic for a given zlib/libjpeg/libwebp build."""
    if fmt == "png":
        return png_bytes(array)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=quality or DEFAULT_QUALITY["jpg"])
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality or DEFAULT_QUALITY["webp"], method=4)
    else:
        raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return buf.getvalue()


def readable_image(path: Path, size: int) -> bool:
    """True when `path` decodes fully to a size×size image (a half-written or foreign file does not)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == (size, size)
    except FileNotFoundError:
        return False
    except Exception:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        return False


# ----------------------------------------------------------------------------------------------------
# Writing in a pool.

def _hwc_uint8(images: Any) -> np.ndarray:
    """CPU tensor N×C×H×W (float in [-1, 1] or uint8) -> numpy uint8 N×H×W×C."""
    import torch

    from augment_gan.pixels import nchw_to_hwc, to_uint8

    with torch.inference_mode():
        return nchw_to_hwc(images if images.dtype == torch.uint8 else to_uint8(images))


def _write_chunk(images: Any, paths: list[str], fmt: str, quality: int | None) -> int:
    """Encode and atomically write images (a CPU tensor N×C×H×W, float in [-1, 1] or uint8, or a numpy
    uint8 N×H×W×C array) to `paths`. Float output is converted here, off the generator's thread."""
    if not isinstance(images, np.ndarray):
        images = _hwc_uint8(images)
    files = png_files(images) if fmt == "png" else [encode_image(a, fmt, quality) for a in images]
    if not DIR_FDS:
        for data, path in zip(files, paths):
            write_atomic(path, data)
        return len(paths)
    folders: dict[str, int] = {}  # folder -> open descriptor, for name-relative opens and renames
    try:
        for data, path in zip(files, paths):
            folder, name = os.path.split(path)
            if folder not in folders:
                folders[folder] = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                write_atomic(name, data, dir_fd=folders[folder])
            except OSError as exc:
                if exc.filename == name:
                    exc.filename = path  # the folder-relative name alone does not say where
                raise
    finally:
        for fd in folders.values():
            os.close(fd)
    return len(paths)


class ImageWriter:
    """Encodes and writes images in a worker pool, a bounded number of chunks ahead of the generator.

    `pool="thread"` (the default) or `"process"`. Threads win on 2 cores (benchmarks/bench_synth.py): zlib
    and file writes release the GIL, and a process pool pays for pickling every image across.
    """

    def __init__(self, workers: int, fmt: str, quality: int | None, on_done: Any, pool: str = "thread"):
        if pool == "thread":
            self.pool: cf.Executor = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth-write")
        elif pool == "process":
            import multiprocessing

            # spawn, not fork: forking a process whose OpenMP threads are running can deadlock.
            self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        else:
            raise UserError(f"unknown writer pool {pool!r}; choose thread or process")
        self.workers, self.fmt, self.quality, self.on_done = workers, fmt, quality, on_done
        self.process = pool == "process"
        self.inflight: deque = deque()
        self.max_inflight = 2 * workers

    def submit(self, images: Any, paths: list[str], payload: list[Any]) -> None:
        """Write `images` (CPU tensor N×C×H×W, float or uint8) to `paths`; `on_done(payload)` once written."""
        if not paths:
            self.on_done(payload)
            return
        if self.process:  # tensors would be pickled with their whole storage: send uint8 HWC arrays
            images = np.ascontiguousarray(_hwc_uint8(images))
        size = math.ceil(len(paths) / self.workers)
        for start in range(0, len(paths), size):
            future = self.pool.submit(_write_chunk, images[start:start + size], paths[start:start + size],
                                      self.fmt, self.quality)
            self.inflight.append((future, payload[start:start + size]))
        self.drain(self.max_inflight)

    def drain(self, limit: int = 0) -> None:
        while len(self.inflight) > limit:
            future, payload = self.inflight.popleft()
            future.result()
            self.on_done(payload)

    def close(self, ok: bool) -> None:
        if not ok:
            for future, _ in self.inflight:
                future.cancel()
        self.pool.shutdown(wait=True)
