"""Image folders -> a cached uint8 array (N×H×W×C) with labels: the reader every command uses.

A folder is scanned recursively for image files (`IMAGE_EXTENSIONS`, any case; hidden files and
folders are ignored). Each file is decoded once per (folder contents, `ReadOptions`) by a pool of
worker processes, squared and resized to `ReadOptions.resolution`, and streamed into a cache directory
as `.npy` + a JSON sidecar, which is memory-mapped (then and on reuse): memory does not grow with the
folder's size. A file that cannot be decoded is
skipped with one warning on the `augment_gan` logger and listed in `ImageSet.skipped`; a folder with no decodable
image is a `UserError`.

Labels follow torchvision's `ImageFolder`: when every image lies inside an immediate subfolder of
the root, the subfolder names (sorted) are the classes; otherwise the set is unlabeled.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import PIL

from augment_gan.atomic import open_atomic, write_bytes_atomic
from augment_gan.decode import (
    CHANNELS,
    FITS,
    IMAGE_EXTENSIONS,
    MODEL_RESOLUTIONS,
    RESOLUTIONS,
    ReadOptions,
    iter_decoded,
    read_image,
    warn,
)
from augment_gan.errors import UserError

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CHANNELS",
    "FITS",
    "IMAGE_EXTENSIONS",
    "MODEL_RESOLUTIONS",
    "RESOLUTIONS",
    "FolderScan",
    "ImageSet",
    "ReadOptions",
    "default_cache_dir",
    "inspect_folder",
    "load_folder",
    "read_image",
    "scan_folder",
]

_log = logging.getLogger(__name__)

# Bump when the decoded pixels for the same file and options would change (resampling, colour
# handling, sidecar layout); old cache entries then simply stop matching.
CACHE_FORMAT_VERSION = 1


@dataclass
class ImageSet:
    """A decoded folder. `images[i]` came from `files[i]` and has label `labels[i]`."""

    images: np.ndarray  # uint8 N×H×W×C, C = `channels`; a read-only memmap of the cache file unless use_cache=False
    labels: np.ndarray | None  # int64 N, indices into `classes`; None when unlabeled
    classes: list[str]  # sorted as torchvision's ImageFolder; [] when unlabeled
    files: list[str]  # relative posix paths, aligned with `images`
    skipped: list[tuple[str, str]]  # (relative path, reason) for files that could not be decoded
    channels: int  # 1 or 3
    root: Path
    layout: str = "classes"  # "classes" (ImageFolder), "flat" (no subfolders) or "mixed"
    sources: list[tuple[int, int, str, str]] = field(default_factory=list)  # (w, h, mode, format) per image
    colour: int = 0  # how many decoded images have colour (some pixel with R, G, B not all equal)
    ignored: int = 0  # non-image files that were not candidates (hidden files are not counted)
    cache_file: Path | None = None  # the .npy this set was loaded from / saved to
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class FolderScan:
    """The candidate image files of a folder, before decoding. `files` are relative posix paths."""

    root: Path
    files: list[str]
    stats: list[tuple[int, int]]  # (size in bytes, mtime_ns), aligned with files; part of the cache key
    classes: list[str]  # [] unless layout == "classes"
    labels: list[int] | None  # aligned with files; None unless layout == "classes"
    layout: str  # "classes" | "flat" | "mixed" | "empty"
    ignored: int  # non-image, non-hidden files
    unlistable: list[tuple[str, str]]  # (relative folder, reason) for subfolders that could not be listed


# ---------------------------------------------------------------------------------------------
# Scanning.


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _path_key(rel: str) -> list[str]:
    # Sort by path components so "a/b/x.png" comes before "a/b-c/y.png" (as os.walk would).
    return rel.split("/")


def scan_folder(root: str | os.PathLike) -> FolderScan:
    """List the candidate image files under `root` (recursive) and decide the label layout.

    Hidden files and folders (name starts with ".") are ignored, as are files whose extension is not
    in `IMAGE_EXTENSIONS`. Symbolic links are followed; a folder reached twice is listed once.
    Raises `UserError` when `root` does not exist or is not a folder.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"folder not found: {root}")
    if not root.is_dir():
        raise UserError(f"not a folder: {root}")
    root = root.resolve()

    files: list[str] = []
    stats: list[tuple[int, int]] = []
    ignored = 0
    unlistable: list[tuple[str, str]] = []

    def on_error(err: OSError) -> None:
        rel = Path(err.filename).resolve().relative_to(root).as_posix() if err.filename else "?"
        unlistable.append((rel, f"cannot list folder: {err.strerror or err}"))

    # Symlinked folders are followed, as torchvision's ImageFolder does (a class folder is often a
    # link to elsewhere); a folder already visited under another name is not entered twice, which
    # also stops link cycles.
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=True):
        kept = []
        for d in sorted(d for d in dirnames if not _is_hidden(d)):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:
                seen.add(real)
                kept.append(d)
        dirnames[:] = kept
        reldir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if _is_hidden(name):
                continue
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            rel = name if reldir == "." else f"{reldir}/{name}"
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                # A dangling symlink or a file removed mid-scan: keep it as a candidate with a
                # sentinel stat so the decoder reports it as skipped, with its reason.
                st = None
            files.append(rel)
            stats.append((st.st_size, st.st_mtime_ns) if st else (-1, -1))

    order = sorted(range(len(files)), key=lambda i: _path_key(files[i]))
    files = [files[i] for i in order]
    stats = [stats[i] for i in order]

    nested = [f for f in files if "/" in f]
    if not files:
        layout = "empty"
    elif len(nested) == len(files):
        layout = "classes"
    elif nested:
        layout = "mixed"
    else:
        layout = "flat"

    classes: list[str] = []
    labels: list[int] | None = None
    if layout == "classes":
        # Plain string sort of folder names, exactly like torchvision's find_classes. Folders with
        # no candidate image are not classes (torchvision would refuse them outright).
        classes = sorted({f.split("/", 1)[0] for f in files})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[f.split("/", 1)[0]] for f in files]
    return FolderScan(root, files, stats, classes, labels, layout, ignored, unlistable)


# ---------------------------------------------------------------------------------------------
# The cache.


def default_cache_dir() -> Path:
    """`$AUGMENT_GAN_CACHE`, else `$XDG_CACHE_HOME/augment-gan`, else `~/.cache/augment-gan`."""
    env = os.environ.get("AUGMENT_GAN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "augment-gan"


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _cache_names(scan: FolderScan, options: ReadOptions) -> tuple[str, str]:
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


def _load_cached(npy: Path, sidecar: Path, scan: FolderScan) -> ImageSet | None:
    try:
        meta = json.loads(sidecar.read_text())
        images = np.load(npy, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    n = len(meta.get("files", []))
    if meta.get("version") != CACHE_FORMAT_VERSION or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[0] != n or images.shape[3] != meta.get("channels"):
        return None
    labels = None if meta["labels"] is None else np.asarray(meta["labels"], dtype=np.int64)
    return ImageSet(
        images=images, labels=labels, classes=list(meta["classes"]), files=list(meta["files"]),
        skipped=[tuple(s) for s in meta["skipped"]], channels=int(meta["channels"]), root=scan.root,
        layout=meta["layout"], sources=[tuple(s) for s in meta["sources"]], colour=int(meta["colour"]),
        ignored=scan.ignored, cache_file=npy, from_cache=True,
    )


def _write_sidecar(dataset: ImageSet, options: ReadOptions, sidecar: Path, prefix: str) -> None:
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
_NPY_HEADER = 128
"""Bytes before the pixels of a cache .npy: an .npy 1.0 header for any uint8 N×R×R×C fits."""


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy (format 1.0) header of a C-order uint8 array of `shape`, padded to `_NPY_HEADER` bytes."""
    text = repr({"descr": "|u1", "fortran_order": False, "shape": tuple(int(v) for v in shape)}).encode("latin1")
    pad = _NPY_HEADER - 10 - len(text) - 1
    assert pad >= 0, shape
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER - 10) + text + b" " * pad + b"\n"


class _PixelFile:
    """Images appended in order to a binary file as the pixels of an .npy array N×R×R×C.

    `channels` 1 or 3, or None for "auto": one channel until the first colour image, then the images
    written so far are widened to three (gray repeated), in place.
    """

    _WIDEN_CHUNK = 4096  # images widened per read/write, so widening also runs in bounded memory

    def __init__(self, fp: BinaryIO, resolution: int, channels: int | None):
        self.fp, self.resolution, self.channels, self.n = fp, resolution, channels or 1, 0
        self.auto = channels is None
        fp.seek(_NPY_HEADER)

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
                reader.seek(_NPY_HEADER + start * size)
                gray = np.frombuffer(reader.read((end - start) * size), np.uint8)
                self.fp.seek(_NPY_HEADER + start * size * 3)
                self.fp.write(np.repeat(gray, 3).tobytes())
                self.fp.flush()  # before the second handle reads the next (earlier) chunk
                end = start
        finally:
            if reader is not self.fp:
                reader.close()
        self.channels = 3
        self.fp.seek(_NPY_HEADER + self.n * size * 3)

    def finish(self) -> tuple[int, int, int, int]:
        """Write the header; returns the array's shape."""
        shape = (self.n, self.resolution, self.resolution, self.channels)
        self.fp.truncate(_NPY_HEADER + self.n * self.resolution * self.resolution * self.channels)
        self.fp.seek(0)
        self.fp.write(_npy_header(shape))
        self.fp.flush()
        return shape


# ---------------------------------------------------------------------------------------------
# Folders.


def _decode_into(fp: BinaryIO, scan: FolderScan, options: ReadOptions, workers, progress: bool
                 ) -> tuple[ImageSet, tuple[int, int, int, int]]:
    """Decode the scanned files into `fp` as an .npy array (`_PixelFile`) -> (the set, pixels still
    unset, and the array's shape). Raises `UserError` when no file decodes."""
    fixed = {"gray": 1, "rgb": 3}.get(options.channels)
    # With channels="auto" the count is decided by the pixels, not the file mode (a grayscale scan saved as
    # RGB, a palette of grays, LA over a white background): the writer widens when a colour image comes.
    pixels = _PixelFile(fp, options.resolution, fixed)
    kept: list[int] = []
    sources: list[tuple[int, int, str, str]] = []
    skipped: list[tuple[str, str]] = list(scan.unlistable)
    colour = 0
    results = iter_decoded(scan.root, scan.files, [size for size, _ in scan.stats], options, workers, progress)
    for i, result in enumerate(results):
        if isinstance(result, str):
            skipped.append((scan.files[i], result))
            continue
        array, gray, source = result
        pixels.append(array)  # broadcasts a C=1 gray image into 3 channels when the folder is RGB
        kept.append(i)
        sources.append(source)
        colour += not gray
    if not kept:
        raise _no_images_error(scan, skipped)
    shape = pixels.finish()
    labels = None
    if scan.labels is not None:
        labels = np.asarray([scan.labels[i] for i in kept], dtype=np.int64)
    dataset = ImageSet(
        images=np.empty((0, *shape[1:]), np.uint8), labels=labels, classes=list(scan.classes),
        files=[scan.files[i] for i in kept], skipped=skipped, channels=shape[3], root=scan.root,
        layout=scan.layout, sources=sources, colour=colour, ignored=scan.ignored,
    )
    return dataset, shape


def _no_images_error(scan: FolderScan, skipped: list[tuple[str, str]]) -> UserError:
    if not scan.files:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        return UserError(f"no image files in {scan.root} (looked recursively for {exts})")
    first, reason = skipped[0]
    return UserError(
        f"no decodable image in {scan.root}: all {len(scan.files)} image files were skipped "
        f"(first: {first}: {reason})"
    )


def _load(root, options: ReadOptions, cache_dir, use_cache: bool, workers, progress: bool) -> ImageSet:
    if not isinstance(options, ReadOptions):
        raise TypeError(f"options must be a ReadOptions, got {type(options).__name__}")
    scan = scan_folder(root)
    if not scan.files:
        raise _no_images_error(scan, [])
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stem, prefix = _cache_names(scan, options)
    npy, sidecar = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    if use_cache:
        hit = _load_cached(npy, sidecar, scan)
        if hit is not None:
            _log.debug(f"{scan.root}: {len(hit)} images from the cache {npy}")
            return hit
        _log.debug(f"{scan.root}: decoding {len(scan.files)} files into the cache {npy}")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # The array first, the sidecar last: an entry only counts once its sidecar exists. Not durable:
            # losing a cache entry on power failure only costs a decode.
            with open_atomic(npy, durable=False) as fp:
                dataset, _ = _decode_into(fp, scan, options, workers, progress)
            _write_sidecar(dataset, options, sidecar, prefix)
        except OSError as exc:
            warn(f"could not write the cache in {cache_dir} ({exc.strerror or exc}); continuing without it")
        else:
            # Read back through a memory map, like a cache hit: pages come and go with the OS page cache,
            # so the process holds no copy of the folder however large it is.
            dataset.images = np.load(npy, mmap_mode="r", allow_pickle=False)
            dataset.cache_file = npy
            return dataset
    buffer = io.BytesIO()
    dataset, shape = _decode_into(buffer, scan, options, workers, progress)
    dataset.images = np.frombuffer(buffer.getbuffer(), np.uint8, offset=_NPY_HEADER).reshape(shape)
    return dataset


def load_folder(
    root: str | os.PathLike,
    options: ReadOptions = ReadOptions(),
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> ImageSet:
    """Decode every image under `root` into an `ImageSet`, through the cache.

    cache_dir: where decoded arrays live (default `default_cache_dir()`); `use_cache=False` decodes
        without reading or writing it. The cache key covers the folder path, every candidate file's
        (relative path, size, mtime), the options, Pillow's version and the cache format version.
    workers: decoding processes (default: available CPUs, at most 8; 1 = in this process).
    progress: show a tqdm bar on stderr while decoding.

    Each skipped file gets one logged warning (also on a cache hit, so the user always
    hears about them). Raises `UserError` for a missing folder or one with no decodable image.
    """
    dataset = _load(root, options, cache_dir, use_cache, workers, progress)
    for rel, reason in dataset.skipped:
        warn(f"skipped {rel}: {reason}")
    if dataset.skipped:
        warn(f"skipped {len(dataset.skipped)} of {len(dataset.skipped) + len(dataset)} files in {dataset.root}")
    if dataset.layout == "mixed":
        warn(f"{dataset.root} has images both at the top level and in subfolders; treating it as unlabeled")
    return dataset


def inspect_folder(
    root: str | os.PathLike,
    options: ReadOptions = ReadOptions(),
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = False,
    use_cache: bool = True,
) -> dict:
    """Summarise a folder as `load_folder` sees it -> a JSON-ready dict (prints nothing).

    Every file is decoded (only a full decode proves a file is readable, and the channel decision
    depends on pixel content), through the same cache as `load_folder`, so inspecting and then
    training decode once. Keys: folder, images, candidates, ignored, layout, labeled, classes
    ({name: count}), channels, channel_decision, colour_images, sizes ({"WxH": count}), modes,
    formats, skipped ([{file, reason}]), options, cache_file.
    """
    dataset = _load(root, options, cache_dir, use_cache, workers, progress)
    classes: dict[str, int] = {}
    if dataset.labels is not None:
        counts = np.bincount(dataset.labels, minlength=len(dataset.classes))
        classes = {name: int(c) for name, c in zip(dataset.classes, counts)}

    def histogram(values) -> dict[str, int]:
        return dict(Counter(values).most_common())

    return {
        "folder": str(dataset.root),
        "images": len(dataset),
        "candidates": len(dataset) + len(dataset.skipped),
        "ignored": dataset.ignored,
        "layout": dataset.layout,
        "labeled": dataset.labels is not None,
        "classes": classes,
        "channels": dataset.channels,
        "channel_decision": "grayscale" if dataset.channels == 1 else "rgb",
        "colour_images": dataset.colour,
        "sizes": histogram(f"{w}x{h}" for w, h, _, _ in dataset.sources),
        "modes": histogram(m for _, _, m, _ in dataset.sources),
        "formats": histogram(fmt for _, _, _, fmt in dataset.sources),
        "skipped": [{"file": f, "reason": r} for f, r in dataset.skipped],
        "options": options.to_dict(),
        "cache_file": str(dataset.cache_file) if dataset.cache_file else None,
    }

