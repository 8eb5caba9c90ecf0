"""A generated corpus of awkward image files (bad and good) for reader tests, reusable by any test.

`write_bad_corpus(folder)` writes, flat in `folder`, files that must be skipped (truncated, empty,
text named .jpg, a PNG whose header claims 50000×50000, unreadable), files that must be ignored
(hidden, non-image), and good files in every mode and format the reader supports. Every good image
is 32×32, so reading at resolution 32 involves no resampling and the expected pixels are exact
(up to `Expected.tolerance` for the lossy JPEGs).
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32  # every good image is SIZE×SIZE

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


@dataclass(frozen=True)
class Expected:
    """What the reader must do with one file of the corpus.

    kind: "ok" (loads), "skip" (named in ImageSet.skipped) or "ignored" (neither loaded nor skipped).
    reason: for "skip", a lower-case substring of the skip reason.
    pixels: for "ok", the expected uint8 SIZE×SIZE×3 RGB pixels at resolution SIZE (white background).
    tolerance: the largest acceptable mean absolute error per channel value (0 = exact).
    gray: for "ok", whether the image is grayscale by content.
    """

    kind: str
    reason: str | None = None
    pixels: np.ndarray | None = None
    tolerance: float = 0.0
    gray: bool | None = None


def _halves(top, bottom) -> np.ndarray:
    """SIZE×SIZE×3: top half one colour, bottom half another."""
    a = np.empty((SIZE, SIZE, 3), np.uint8)
    a[: SIZE // 2] = top
    a[SIZE // 2 :] = bottom
    return a


def _left_right(left, right) -> np.ndarray:
    return np.ascontiguousarray(_halves(left, right).transpose(1, 0, 2))


def _gradient() -> np.ndarray:
    """A colourful, lossless-only test pattern: R follows x, G follows y, B constant."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return np.stack([x * 8, y * 8, np.full_like(x, 77)], axis=-1).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose IHDR claims width×height 8-bit RGB (valid CRCs, a few bytes of IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _save(image: Image.Image, path: Path, fmt: str, **kwargs) -> None:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    path.write_bytes(buffer.getvalue())


def write_bad_corpus(folder: str | os.PathLike) -> dict[str, Expected]:
    """Write the corpus into `folder` (created if needed) -> {relative posix path: Expected}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expected] = {}

    # --- Files that must be skipped, each with its reason. ---
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")  # noise does not compress: the cut lands in IDAT
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    expected["truncated.png"] = Expected("skip", reason="truncated")

    (folder / "empty.png").write_bytes(b"")
    expected["empty.png"] = Expected("skip", reason="empty")

    (folder / "notes-not-an-image.jpg").write_text("this is a text file with an image extension\n")
    expected["notes-not-an-image.jpg"] = Expected("skip", reason="not an image")

    (folder / "bomb.png").write_bytes(bomb_png())
    expected["bomb.png"] = Expected("skip", reason="50000×50000")

    locked = folder / "unreadable.png"
    _save(Image.fromarray(noise), locked, "PNG")
    locked.chmod(0)
    try:
        locked.open("rb").close()
        readable = True  # running as root: permissions do not stop us, so this case cannot be made
    except PermissionError:
        readable = False
    if readable:
        locked.unlink()
    else:
        expected["unreadable.png"] = Expected("skip", reason="permission denied")

    # --- Files that must be ignored (neither loaded nor reported). ---
    _save(Image.fromarray(noise), folder / ".hidden.png", "PNG")
    expected[".hidden.png"] = Expected("ignored")
    (folder / ".thumbnails").mkdir(exist_ok=True)
    _save(Image.fromarray(noise), folder / ".thumbnails" / "thumb.png", "PNG")
    expected[".thumbnails/thumb.png"] = Expected("ignored")
    (folder / "README.txt").write_text("not an image\n")
    expected["README.txt"] = Expected("ignored")
    (folder / "labels.csv").write_text("file,label\n")
    expected["labels.csv"] = Expected("ignored")

    # --- Good files: every mode and format, with the pixels they must decode to. ---
    gradient = _gradient()
    _save(Image.fromarray(gradient), folder / "rgb.png", "PNG")
    expected["rgb.png"] = Expected("ok", pixels=gradient, gray=False)

    _save(Image.fromarray(gradient), folder / "UPPER-CASE.PNG", "PNG")
    expected["UPPER-CASE.PNG"] = Expected("ok", pixels=gradient, gray=False)

    # CMYK JPEG. Pillow's RGB<->CMYK is the naive inversion, so the round trip is exact but for JPEG.
    quadrants = _halves(RED, BLUE)
    quadrants[:, SIZE // 2 :] = _halves(GREEN, WHITE)[:, SIZE // 2 :]
    _save(Image.fromarray(quadrants).convert("CMYK"), folder / "cmyk.jpg", "JPEG", quality=95)
    expected["cmyk.jpg"] = Expected("ok", pixels=quadrants, tolerance=6.0, gray=False)

    # 16-bit grayscale PNG: value v*257 must come back as exactly v.
    levels = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 256).astype(np.uint16)
    _save(Image.fromarray(levels * 257), folder / "gray16.png", "PNG")
    assert Image.open(folder / "gray16.png").mode.startswith("I")  # really a 16-bit file
    expected["gray16.png"] = Expected("ok", pixels=np.repeat(levels.astype(np.uint8)[..., None], 3, 2), gray=True)

    # EXIF orientation 6 ("rotate 90° clockwise to display"): stored red-top/blue-bottom must
    # display blue-left/red-right.
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(Image.fromarray(_halves(RED, BLUE)), folder / "exif-rotated.jpg", "JPEG", quality=95, exif=exif.tobytes())
    expected["exif-rotated.jpg"] = Expected("ok", pixels=_left_right(BLUE, RED), tolerance=6.0, gray=False)

    # Palette PNG with a transparent index: left half transparent red -> white background.
    indices = np.zeros((SIZE, SIZE), np.uint8)
    indices[:, SIZE // 2 :] = 1
    palette_image = Image.fromarray(indices, "P")
    palette_image.putpalette([*RED, *BLUE] + [0] * (254 * 3))
    _save(palette_image, folder / "palette-transparent.png", "PNG", transparency=0)
    expected["palette-transparent.png"] = Expected("ok", pixels=_left_right(WHITE, BLUE), gray=False)

    opaque_palette = Image.fromarray(indices, "P")
    opaque_palette.putpalette([*RED, *BLUE] + [0] * (254 * 3))
    _save(opaque_palette, folder / "palette.png", "PNG")
    expected["palette.png"] = Expected("ok", pixels=_left_right(RED, BLUE), gray=False)

    # RGBA with half-transparent red over white: 255*a + 255*(1-a) for R, 255*(1-a) for G and B.
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 128
    _save(Image.fromarray(rgba, "RGBA"), folder / "rgba.png", "PNG")
    expected["rgba.png"] = Expected("ok", pixels=np.full((SIZE, SIZE, 3), (255, 127, 127), np.uint8),
                                    tolerance=1.0, gray=False)

    # LA: black, left half fully transparent -> white/black, still grayscale.
    la = np.zeros((SIZE, SIZE, 2), np.uint8)
    la[:, SIZE // 2 :, 1] = 255
    _save(Image.fromarray(la, "LA"), folder / "la.png", "PNG")
    expected["la.png"] = Expected("ok", pixels=_left_right(WHITE, BLACK), gray=True)

    # Mode "1": a checkerboard of 4-pixel squares.
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    checker = (((x // 4) + (y // 4)) % 2 * 255).astype(np.uint8)
    _save(Image.fromarray(checker).convert("1"), folder / "mode1.png", "PNG")
    expected["mode1.png"] = Expected("ok", pixels=np.repeat(checker[..., None], 3, 2), gray=True)

    # Animated GIF: only the first frame counts.
    frames = [Image.fromarray(_halves(RED, GREEN)), Image.fromarray(_halves(BLUE, BLUE))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (folder / "animated.gif").write_bytes(buffer.getvalue())
    expected["animated.gif"] = Expected("ok", pixels=_halves(RED, GREEN), gray=False)

    _save(Image.fromarray(gradient), folder / "lossless.webp", "WEBP", lossless=True)
    expected["lossless.webp"] = Expected("ok", pixels=gradient, gray=False)

    _save(Image.fromarray(gradient), folder / "rgb.bmp", "BMP")
    expected["rgb.bmp"] = Expected("ok", pixels=gradient, gray=False)

    _save(Image.fromarray(gradient), folder / "rgb.tiff", "TIFF")
    expected["rgb.tiff"] = Expected("ok", pixels=gradient, gray=False)

    # Float TIFF in [0, 1] (mode F) -> v*255.
    ramp = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 256).astype(np.uint8)
    _save(Image.fromarray(ramp.astype(np.float32) / 255.0, "F"), folder / "float.tif", "TIFF")
    expected["float.tif"] = Expected("ok", pixels=np.repeat(ramp[..., None], 3, 2), tolerance=0.0, gray=True)

    return expected
