"""One image file -> a square uint8 array: the options, the decoding rules and the worker pool.

`ReadOptions` says how files become pixels (resolution, crop mode, background, channels); `read_image`
decodes one file and `iter_decoded` many, in worker processes. `augment_gan.data` builds folders and
their cache on top of this.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from augment_gan.errors import UserError

_log = logging.getLogger("augment_gan.data")  # decoding is part of reading a folder (augment_gan.data)

# Lower-case; matched case-insensitively. GIF, WebP and TIFF contribute their first frame only.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

# The lists of choices every command and config takes; the CLI builds its choices from these.
RESOLUTIONS = (8, 16, 32, 64, 128, 256)
"""Side lengths a folder can be read at (`ReadOptions.resolution`, inspect/merge/evaluate --resolution)."""
MODEL_RESOLUTIONS = (32, 64, 128, 256)
"""Side lengths the GAN (`augment_gan.models`) is trained at (`TrainConfig.resolution`, fit --resolution),
each tested in tests/test_gan_parts.py. The reader also takes 8 and 16, so tests can run on tiny arrays."""
FITS = ("center-crop", "pad", "resize")
"""How a non-square image becomes square (see `ReadOptions.fit`)."""
CHANNELS = ("auto", "gray", "rgb")
"""Channels an image folder is read with (see `ReadOptions.channels`)."""

# Below this many files a worker pool costs more than it saves (fork + pickling ~50 ms; a small
# PNG decodes in ~0.3 ms). Measured on the 2-core dev machine: 1,906 emoji PNGs take 0.66 s in
# one process, 0.73 s with 2 threads (Python overhead per file holds the GIL) and 0.44 s with
# 2 processes; 6,000 MNIST PNGs 2.2 s / 2.5 s / 1.1 s. Hence processes, not threads.
_POOL_MIN_FILES = 32
_POOL_CHUNK = 32
# Chunks in flight per worker: enough to keep every worker busy while the consumer writes a result, few
# enough that decoded pixels never pile up (4 × 32 × 64×64×3 bytes = 1.5 MB per worker at 64 px).
_POOL_AHEAD = 4


@dataclass(frozen=True)
class ReadOptions:
    """How files become pixels. Part of the cache key: changing any field re-decodes.

    resolution: output side length in pixels (square output), one of `RESOLUTIONS`.
    fit: how a non-square image becomes square — "center-crop" keeps the central square (default,
        like most GAN dataset tools), "pad" letterboxes with `background`, "resize" stretches.
    background: RGB colour that transparent pixels are composited over and that "pad" fills with.
    channels: "auto" = 1 channel when every decoded image is grayscale, else 3; "gray" / "rgb" force it.
    max_pixels: images whose header claims more pixels than this are skipped unread (decompression
        bombs). Default = Pillow's own `Image.MAX_IMAGE_PIXELS` (89,478,485 ≈ 256 MB as 24-bit RGB),
        enforced by us per call rather than through Pillow's global warning.
    """

    resolution: int = 32  # TrainConfig's default, so `inspect` and `fit` read a folder alike by default
    fit: str = "center-crop"
    background: tuple[int, int, int] = (255, 255, 255)
    channels: str = "auto"
    max_pixels: int = 89_478_485

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or self.resolution not in RESOLUTIONS:
            raise UserError(
                f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}, got {self.resolution!r}"
            )
        if self.fit not in FITS:
            raise UserError(f"fit must be one of {', '.join(FITS)}, got {self.fit!r}")
        if self.channels not in CHANNELS:
            raise UserError(f"channels must be one of {', '.join(CHANNELS)}, got {self.channels!r}")
        background = tuple(self.background)
        if len(background) != 3 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in background
        ):
            raise UserError(f"background must be three integers in 0..255, got {self.background!r}")
        # Normalise lists (e.g. from JSON) to a tuple of ints so equal options hash equally.
        object.__setattr__(self, "background", tuple(int(v) for v in background))
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise UserError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "background": list(self.background)}

    @classmethod
    def from_checkpoint(cls, ckpt: Any) -> "ReadOptions":
        """How `fit` read the training folder of a checkpoint: its resolution, fit and background, with the
        channel count it found (so a folder is read like the images the model was trained on)."""
        return cls(resolution=ckpt.resolution, fit=ckpt.config.fit, background=tuple(ckpt.config.background),
                   channels="gray" if ckpt.channels == 1 else "rgb")


# ---------------------------------------------------------------------------------------------
# Decoding one file.


class _Skip(Exception):
    """A file that cannot be decoded; the message is the one-line reason."""


_GRAY_MODES = ("1", "L")
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _wide_to_uint8(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale -> 8-bit "L", scaled by the range the mode implies."""
    a = np.asarray(image)
    mode = image.mode
    if mode.startswith("I;16") or (mode == "I" and image.format == "PNG"):
        # 16-bit data (older Pillow opens 16-bit PNG as "I"): 65535 / 255 = 257 exactly.
        scaled = a.astype(np.float64) / 257.0
    elif mode == "I":
        # 32-bit integer TIFF etc.: the mode says nothing about the range, so use the data's.
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 255:
            scaled = a.astype(np.float64)
        elif lo >= 0 and hi <= 65535:
            scaled = a.astype(np.float64) / 257.0
        else:
            scaled = (a.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1))
    else:  # "F": floats in [0, 1] (most common), [0, 255], or anything else min-max scaled
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = a
        else:
            scaled = (a - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _to_gray_or_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode -> "L" (grayscale without alpha) or "RGB" (alpha composited over background)."""
    mode = image.mode
    if mode in _GRAY_MODES:
        return image.convert("L")
    if mode in _WIDE_GRAY_MODES:
        return _wide_to_uint8(image)
    if mode == "P":
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa", "RGBA"):
        image = image.convert("RGBA")
    elif mode != "RGB":  # CMYK, YCbCr, LAB, HSV, ... (ICC profiles are not applied)
        image = image.convert("RGB")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (*background, 255))
        image = Image.alpha_composite(canvas, image).convert("RGB")
    return image


def _square(image: Image.Image, options: ReadOptions) -> Image.Image:
    """Make the image square by `options.fit`, then resize to `options.resolution`."""
    r = options.resolution
    w, h = image.size
    if w != h and options.fit == "center-crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    elif w != h and options.fit == "pad":
        s = max(w, h)
        bg = options.background
        if image.mode == "L" and not bg[0] == bg[1] == bg[2]:
            image = image.convert("RGB")  # a coloured border makes a gray image colour
        fill = bg if image.mode == "RGB" else bg[0]
        canvas = Image.new(image.mode, (s, s), fill)
        canvas.paste(image, ((s - w) // 2, (s - h) // 2))
        image = canvas
    if image.size != (r, r):
        # Lanczos, as NVlabs' dataset_tool uses; reducing_gap first shrinks big images by an
        # integer factor (box filter), which is much faster and visually identical at these sizes.
        image = image.resize((r, r), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def _decode(path: str, size: int, options: ReadOptions) -> tuple[np.ndarray, bool, tuple[int, int, str, str]]:
    """Decode one file -> (pixels H×W×C uint8, is_gray, (w, h, mode, format) of the source).

    With channels="auto", gray images come back with C=1 and colour ones with C=3 (the folder-level
    decision is made by the caller). Raises `_Skip` with a one-line reason on any failure.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # opening a FIFO would wait for a writer forever
            raise _Skip("not a regular file (a FIFO, socket or device)")
    except OSError:
        pass  # a missing or unreadable file: open() below gives the reason
    if size == 0:
        raise _Skip("empty file (0 bytes)")
    try:
        with open(path, "rb") as fp:
            image = Image.open(fp)
            w, h = image.size
            source = (int(w), int(h), image.mode, image.format or "?")
            if w * h > options.max_pixels:
                raise _Skip(
                    f"header claims {w}×{h} = {w * h:,} pixels, over the max_pixels limit of "
                    f"{options.max_pixels:,} (possible decompression bomb)"
                )
            if image.format == "JPEG":
                # Let libjpeg decode at 1/2..1/8 scale (DCT scaling) while staying >= 2× the target,
                # so a 24-MP photo costs a fraction of a full decode before the Lanczos resize.
                image.draft(None, (2 * options.resolution, 2 * options.resolution))
            image.load()  # GIF/WebP/TIFF: the first frame
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:
                # Malformed EXIF should not cost a good image: keep the stored orientation.
                pass
            image = _to_gray_or_rgb(image, options.background)
    except _Skip:
        raise
    except PermissionError:
        raise _Skip("permission denied") from None
    except FileNotFoundError:
        raise _Skip("file not found (removed or a dangling link)") from None
    except Image.UnidentifiedImageError:
        raise _Skip("not an image Pillow can identify (wrong extension or corrupt header)") from None
    except Image.DecompressionBombError as exc:
        raise _Skip(f"possible decompression bomb: {exc}") from None
    except MemoryError:
        raise _Skip("out of memory while decoding") from None
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, EOFError, struct.error...
        message = " ".join(str(exc).split()) or type(exc).__name__
        if "truncated" in message.lower():
            raise _Skip(f"truncated file ({message})") from None
        raise _Skip(f"corrupt or unsupported image ({type(exc).__name__}: {message})") from None

    image = _square(image, options)
    if image.mode == "L":
        pixels, gray = np.asarray(image)[:, :, None], True
    else:
        pixels = np.asarray(image)
        gray = bool(np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2]))
        if gray:
            pixels = pixels[..., :1]  # content decides, so a gray scan saved as RGB stays gray
    if options.channels == "gray" and not gray:
        pixels = np.asarray(image.convert("L"))[:, :, None]  # ITU-R 601-2 luma
    elif options.channels == "rgb" and gray:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels), gray, source


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    # We check `max_pixels` ourselves from the header, per call. Pillow's global limit would warn
    # (DecompressionBombWarning) or raise at its own threshold regardless of the caller's option, so
    # it is lifted while we decode in this process and restored after.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_image(path: str | os.PathLike, options: ReadOptions = ReadOptions()) -> np.ndarray:
    """Decode one image file -> uint8 H×W×C (C=1 if the image is grayscale under channels="auto").

    Raises `UserError` with a one-line reason when the file cannot be decoded.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        with _own_pixel_limit():
            pixels, _, _ = _decode(str(path), size, options)
    except _Skip as exc:
        raise UserError(f"cannot decode {path}: {exc}") from None
    return pixels


# Worker-process state: options are sent once per worker, not once per file.
_worker_options: ReadOptions | None = None


def _init_worker(options: ReadOptions) -> None:
    global _worker_options
    _worker_options = options
    Image.MAX_IMAGE_PIXELS = None  # this process only; see _own_pixel_limit


def _decode_in_worker(job: tuple[str, int]):
    path, size = job
    try:
        return _decode(path, size, _worker_options)
    except _Skip as exc:
        return str(exc)


def _decode_chunk(jobs: list[tuple[str, int]]) -> list:
    return [_decode_in_worker(job) for job in jobs]


def _decode_in_process(job: tuple[str, int], options: ReadOptions):
    path, size = job
    try:
        return _decode(path, size, options)
    except _Skip as exc:
        return str(exc)


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def iter_decoded(root: Path, files: list[str], sizes: list[int], options: ReadOptions, workers: int | None,
                 progress: bool) -> Iterator:
    """Decode `root / f` for every f in `files` (of these byte sizes); yields, in the order of `files`, a
    result tuple (pixels, gray, source) or a one-line skip reason. At most `_POOL_AHEAD` chunks per worker
    are decoded ahead of the consumer, so memory stays bounded whatever the number of files."""
    jobs = [(str(root / f), size) for f, size in zip(files, sizes)]
    workers = _default_workers() if workers is None else max(1, int(workers))
    bar = tqdm(total=len(jobs), desc=f"decoding {root.name}", unit="img", file=sys.stderr,
               disable=not progress, leave=False, dynamic_ncols=True)
    done = 0
    try:
        if workers > 1 and len(jobs) >= _POOL_MIN_FILES:
            try:
                with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(options,)) as pool:
                    ahead: deque = deque()
                    # The chunks, then None: with nothing left to submit, every chunk in flight is collected.
                    for chunk in [*(jobs[i:i + _POOL_CHUNK] for i in range(0, len(jobs), _POOL_CHUNK)), None]:
                        if chunk is not None:
                            ahead.append(pool.submit(_decode_chunk, chunk))
                        while len(ahead) >= (_POOL_AHEAD * workers if chunk is not None else 1):
                            results = ahead.popleft().result()
                            for result in results:
                                yield result
                                done += 1
                            bar.update(len(results))
            except BrokenProcessPool:
                # E.g. a spawn-start platform and a script without `if __name__ == "__main__":`.
                # Decoding in this process is slower but gives the same pixels; it goes on where the
                # pool stopped.
                warn("worker processes failed to start; decoding in one process")
        if done < len(jobs):
            with _own_pixel_limit():
                for job in jobs[done:]:
                    yield _decode_in_process(job, options)
                    bar.update()
    finally:
        bar.close()


def warn(message: str) -> None:
    """A reading problem the user should see (a skipped file, no cache): a warning on the package's logger."""
    _log.warning(message)
