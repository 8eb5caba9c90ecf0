"""Image folders -> a cached uint8 array (N×H×W×C) with labels: the reader every command uses.

A folder is scanned recursively for image files (`IMAGE_EXTENSIONS`, any case; hidden files and
folders are ignored). Each file is decoded once per (folder contents, `ReadOptions`) by a pool of
worker processes, squared and resized to `ReadOptions.resolution`, and streamed into a cache directory
as `.npy` + a JSON sidecar (`augment_gan.cache`), which is memory-mapped (then and on reuse): memory does not grow with the
folder's size. A file that cannot be decoded is
skipped with one warning on the `augment_gan` logger and listed in `ImageSet.skipped`; a folder with no decodable
image is a `UserError`.

Labels follow torchvision's `ImageFolder`: when every image lies inside an immediate subfolder of
the root, the subfolder names (sorted) are the classes; otherwise the set is unlabeled.
"""
from __future__ import annotations

import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from augment_gan.atomic import open_atomic
from augment_gan.cache import (
    CACHE_FORMAT_VERSION,
    NPY_HEADER,
    PixelFile,
    cache_names,
    default_cache_dir,
    read_entry,
    write_sidecar,
)
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
# Folders.


def _load_cached(npy: Path, sidecar: Path, scan: FolderScan) -> ImageSet | None:
    entry = read_entry(npy, sidecar)
    if entry is None:
        return None
    images, meta = entry
    labels = None if meta["labels"] is None else np.asarray(meta["labels"], dtype=np.int64)
    return ImageSet(
        images=images, labels=labels, classes=list(meta["classes"]), files=list(meta["files"]),
        skipped=[tuple(s) for s in meta["skipped"]], channels=int(meta["channels"]), root=scan.root,
        layout=meta["layout"], sources=[tuple(s) for s in meta["sources"]], colour=int(meta["colour"]),
        ignored=scan.ignored, cache_file=npy, from_cache=True,
    )


def _decode_into(fp: BinaryIO, scan: FolderScan, options: ReadOptions, workers, progress: bool
                 ) -> tuple[ImageSet, tuple[int, int, int, int]]:
    """Decode the scanned files into `fp` as an .npy array (`PixelFile`) -> (the set, pixels still
    unset, and the array's shape). Raises `UserError` when no file decodes."""
    fixed = {"gray": 1, "rgb": 3}.get(options.channels)
    # With channels="auto" the count is decided by the pixels, not the file mode (a grayscale scan saved as
    # RGB, a palette of grays, LA over a white background): the writer widens when a colour image comes.
    pixels = PixelFile(fp, options.resolution, fixed)
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
    stem, prefix = cache_names(scan, options)
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
            write_sidecar(dataset, options, sidecar, prefix)
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
    dataset.images = np.frombuffer(buffer.getbuffer(), np.uint8, offset=NPY_HEADER).reshape(shape)
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

