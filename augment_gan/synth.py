"""Writing a synthetic image set: index plan, shards, resume, filters, parallel atomic writes, manifest.

The plan
    Image i of a set is a pure function of (checkpoint, seed, options, i). Classes are assigned round-robin
    over the selected classes (i % C), so class c holds the final indices c, c + C, c + 2C, ... and the
    default is balanced. Latents come from `sample.latents(seed, [latent index])`.

    Work is cut into *units*: one class, up to `GROUP_SIZE` (256) consecutive final images of it. A unit's
    candidates are its own final indices (the "primaries") plus, with `--keep-top F`, extra latent indices
    from beyond the class's end, so that a unit of k finals has ceil(k/F) candidates (per class:
    ceil(n_c/F)). Extras of class c use the latent indices c + C·t for t = n_c, n_c + 1, ... in unit order.

Filters (off by default; every decision is a manifest row)
    `--dedup` drops candidates whose nearest training image (16×16 pixels, see `DedupIndex`) is closer than
    the 1st percentile of real-to-real nearest-neighbour distances. `--keep-top F` ranks a unit's surviving
    candidates by D's logit and keeps the best k. Kept primaries keep their own index; kept extras take
    the unit's vacated indices in ascending order. So `--keep-top 1` equals no filter, an image that survives
    the filter sits in the same file as in an unfiltered run, and `--dedup` alone leaves gaps (counted as
    missing) that `--keep-top` refills from its oversampled pool. Ranking happens within a unit, not over the
    whole class: for n_c <= 256 that is exactly the per-class top F, beyond it each block of 256 keeps its own
    top F. That is what lets shards and resume work on units independently, with bounded memory.

Shards and resume
    Shard K of N owns the units at positions K, K+N, ...; `RANK`/`WORLD_SIZE` (torchrun) set the shard when
    `--shard` is not given. A unit is done when its files exist and decode (and, with filters, when every
    candidate has a manifest row); a rerun with the same settings skips done work, so an interrupted run or
    shard resumes where it stopped. Each shard writes `manifest.shard-K-of-N.jsonl`; whichever process
    finds every unit of the set done writes the merged `manifest.jsonl` (rerunning any shard, or the whole
    set without `--shard`, merges too).

Safety
    Every file is written as `<name>.tmp-<pid>` in its final folder and renamed (`os.replace`), so a killed
    run leaves at most temporary files, which the next run removes. A non-empty output folder is only
    reused when its `synth.json` records the same settings; anything else needs `--overwrite`. Class names
    come from the checkpoint and are checked to be plain folder names.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import json
import math
import os
import re
import struct
import sys
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from augment_gan import __version__
from augment_gan.atomic import write_bytes_atomic
from augment_gan.errors import UserError

FORMATS = ("png", "jpg", "webp")
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
GROUP_SIZE = 256
DEDUP_SIZE = 16
DEDUP_PERCENTILE = 1.0
# A candidate closer than this (RMS in [-1, 1] units: one grey level) is a copy even if the real set's own
# 1st-percentile distance is 0 because it holds duplicates.
DEDUP_MIN_THRESHOLD = 2.0 / 255.0
MANIFEST = "manifest.jsonl"
SETTINGS = "synth.json"
LAYOUT_VERSION = 1
_IMAGE_NAME = re.compile(r"^(\d{6,})\.(png|jpg|webp)$")
_IMAGE_TMP = re.compile(r"^(\d{6,})\.(png|jpg|webp)\.tmp-.+$")


# ----------------------------------------------------------------------------------------------------
# Configuration and summary.

@dataclass(frozen=True)
class SynthConfig:
    """Options of one `synth` call. The first group defines the set (recorded in synth.json); the second
    only changes how it is computed, never its bytes."""

    n: int | None = None
    """Number of images (split over the selected classes round-robin). Give `n` or `per_class`."""
    per_class: int | None = None
    """Images per selected class (conditional checkpoints)."""
    classes: tuple[str, ...] | None = None
    """Subset of the checkpoint's classes to generate (default: all)."""
    seed: int = 0
    truncation: float = 1.0
    """ψ: latents are scaled by ψ toward the prior's mean 0 (see `augment_gan.sample`)."""
    format: str = "png"
    quality: int | None = None
    """JPEG/WebP quality 1-100 (default 95 / 90); PNG is lossless and takes none."""
    keep_top: float | None = None
    """Keep this fraction of candidates by discriminator score, per class (None: no rejection)."""
    dedup: bool = False
    """Drop near-copies of training images."""
    dedup_real: str | None = None
    """Training images for `dedup` (default: the folder recorded in the checkpoint)."""

    batch_size: int | None = None
    """Generator batch (default 256 up to 64px, fewer above; never changes the images)."""
    shard: tuple[int, int] | None = None
    """(K, N): write only shard K of N; None = from RANK/WORLD_SIZE, else the whole set."""
    overwrite: bool = False
    device: str = "auto"
    workers: int | None = None
    """Encoder threads (default: 1 per 8 cores on a CPU device, all cores but one with a GPU)."""
    threads: int | None = None
    """torch intra-op threads of each generator lane (default: see `default_lanes`)."""
    lanes: int | None = None
    """Generator forwards running at once, each on its own thread and batch (default: see `default_lanes`)."""
    pool: str = "thread"
    """Encoder pool: "thread" or "process" (threads measured faster; see benchmarks/bench_synth.py)."""
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.n is None) == (self.per_class is None):
            raise UserError("give the number of images: --n N or --per-class N (not both)")
        for name in ("n", "per_class"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
            if not self.classes:
                raise UserError("--classes is empty")
        if self.format not in FORMATS:
            raise UserError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.quality is not None:
            if self.format == "png":
                raise UserError("--quality applies to jpg and webp; png is lossless")
            if not 1 <= self.quality <= 100:
                raise UserError(f"--quality must be in 1..100, got {self.quality}")
        if not 0.0 <= self.truncation <= 2.0:
            raise UserError(f"--truncation must be in [0, 2], got {self.truncation}")
        if self.keep_top is not None and not 0.0 < self.keep_top <= 1.0:
            raise UserError(f"--keep-top must be a fraction in (0, 1], got {self.keep_top}")
        if self.dedup_real is not None and not self.dedup:
            raise UserError("--dedup-real needs --dedup")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        if self.lanes is not None and self.lanes < 1:
            raise UserError(f"--lanes must be >= 1, got {self.lanes}")
        if self.pool not in ("thread", "process"):
            raise UserError(f"unknown writer pool {self.pool!r}; choose thread or process")
        if self.shard is not None:
            k, n = self.shard
            if not (n >= 1 and 0 <= k < n):
                raise UserError(f"--shard K/N needs 0 <= K < N, got {k}/{n}")


@dataclass
class SynthSummary:
    """What one `synth` call did, counted over the units of its shard."""

    out: str
    shard: tuple[int, int]
    planned: int
    """Final images this shard is responsible for."""
    written: int
    """Files written by this call."""
    existing: int
    """Files that were already there (resume) and were kept."""
    images: int
    """Files present at the end (written + existing)."""
    missing: int
    """Final indices left empty because `--dedup` dropped more than `--keep-top` could refill."""
    dropped_keep_top: int
    dropped_dedup: int
    dedup_threshold: float | None
    manifest: str | None
    """The merged manifest, or None while other shards are unfinished."""
    seconds: float
    images_per_second: float
    workers: int
    threads: int
    lanes: int
    batch_size: int
    device: str
    shard_manifest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise UserError(f"--shard must look like K/N (e.g. 0/4), got {text!r}")
    k, n = int(match.group(1)), int(match.group(2))
    if not (n >= 1 and 0 <= k < n):
        raise UserError(f"--shard K/N needs 0 <= K < N, got {k}/{n}")
    return k, n


def shard_from_env() -> tuple[int, int]:
    """The shard of this process under torchrun (RANK of WORLD_SIZE), else (0, 1)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise UserError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return rank, world


def default_batch_size(resolution: int) -> int:
    # 256 saturates 2 CPU cores at 32-64px (benchmarks/bench_synth.py); keep activations bounded above that.
    return 256 if resolution <= 64 else max(16, 256 * 64 * 64 // resolution**2)


def default_lanes(device_type: str, lanes: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(generator lanes, torch threads per lane), filling in whichever of the two is None.

    A GPU runs one lane with torch's threads. On a CPU the default is one lane per core with one thread
    each: OpenMP threads wait for each other at the end of every operator, so when the encoder thread takes
    a core one of G's threads stalls the other; independent single-threaded lanes do not stall
    (benchmarks/bench_synth.py measures both).
    """
    import torch

    if device_type != "cpu":
        return lanes or 1, threads or torch.get_num_threads()
    cores = os.cpu_count() or 1
    if lanes is None:
        lanes = max(1, cores // threads) if threads else cores
    return lanes, threads or max(1, cores // lanes)


def default_workers(device_type: str = "cpu") -> int:
    """Encoder threads: on a CPU device one per 8 cores (encoding a PNG costs ~5-15% of generating it, see
    benchmarks/bench_synth.py); with a GPU generating, every core but one."""
    cores = os.cpu_count() or 2
    return max(1, cores // 8) if device_type == "cpu" else max(1, cores - 1)


# ----------------------------------------------------------------------------------------------------
# The plan: which latent indices become which files.

def check_class_name(name: Any) -> str:
    """A checkpoint's class name is used as a folder name: reject anything that could leave the folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or "\x00" in name:
        raise UserError(f"the checkpoint's class name {name!r} is not usable as a folder name")
    if "/" in name or "\\" in name or (os.sep in name) or (os.altsep and os.altsep in name):
        raise UserError(f"the checkpoint's class name {name!r} contains a path separator")
    return name


def _ceil_div_fraction(k: int, keep: Fraction) -> int:
    return -((-k * keep.denominator) // keep.numerator)  # ceil(k / keep), exact


@dataclass(frozen=True)
class Unit:
    """One class, up to GROUP_SIZE consecutive final images of it, and their candidates."""

    position: int
    class_pos: int
    group: int
    label: int | None
    class_name: str | None
    finals: tuple[int, ...]
    candidates: tuple[int, ...]
    """Latent indices: the finals themselves (primaries), then the keep-top extras."""


@dataclass(frozen=True)
class Plan:
    n: int
    classes: tuple[str | None, ...]
    """Selected class names, (None,) for an unconditional checkpoint."""
    labels: tuple[int | None, ...]
    counts: tuple[int, ...]
    keep_top: float | None
    ext: str
    units: tuple[Unit, ...] = field(repr=False)

    def relpath(self, unit: Unit, index: int) -> str:
        name = f"{index:06d}.{self.ext}"
        return name if unit.class_name is None else f"{unit.class_name}/{name}"

    def label_of(self, index: int) -> int | None:
        """The label plan: final index i belongs to selected class i % C."""
        return self.labels[index % len(self.classes)]

    def owned(self, shard: tuple[int, int]) -> list[Unit]:
        k, n = shard
        return [u for u in self.units if u.position % n == k]

    def unit_of_final(self, index: int) -> Unit | None:
        c, t = index % len(self.classes), index // len(self.classes)
        if t >= self.counts[c]:
            return None
        return self._by_class_group.get((c, t // GROUP_SIZE))

    @property
    def _by_class_group(self) -> dict[tuple[int, int], Unit]:
        cached = self.__dict__.get("_cg")
        if cached is None:
            cached = {(u.class_pos, u.group): u for u in self.units}
            object.__setattr__(self, "_cg", cached)
        return cached


def make_plan(checkpoint_classes: list[str], num_classes: int, *, n: int | None = None,
              per_class: int | None = None, classes: tuple[str, ...] | None = None,
              keep_top: float | None = None, fmt: str = "png") -> Plan:
    """The final indices, labels and candidates of a set (a pure function of its options)."""
    if num_classes == 0:
        if per_class is not None or classes:
            raise UserError("--per-class and --classes need a class-conditional checkpoint; this one is unconditional")
        names: tuple[str | None, ...] = (None,)
        labels: tuple[int | None, ...] = (None,)
    else:
        all_names = [check_class_name(c) for c in checkpoint_classes]
        if classes:
            unknown = [c for c in classes if c not in all_names]
            if unknown:
                raise UserError(f"unknown classes {', '.join(unknown)}; the checkpoint has {', '.join(all_names)}")
            if len(set(classes)) != len(classes):
                raise UserError("--classes lists a class twice")
            names = tuple(classes)
        else:
            names = tuple(all_names)
        labels = tuple(all_names.index(c) for c in names)
    C = len(names)
    if per_class is not None:
        counts = (per_class,) * C
        n = per_class * C
    else:
        assert n is not None
        counts = tuple(n // C + (c < n % C) for c in range(C))
    keep = Fraction(repr(float(keep_top))) if keep_top is not None else Fraction(1)

    def extras_before(k: int) -> int:  # extra candidates a class needs for its first k finals
        return _ceil_div_fraction(k, keep) - k

    units = []
    for g in range(math.ceil(max(counts) / GROUP_SIZE)):
        for c in range(C):
            start, end = g * GROUP_SIZE, min((g + 1) * GROUP_SIZE, counts[c])
            if start >= end:
                continue
            finals = tuple(c + C * t for t in range(start, end))
            extra_t = range(counts[c] + extras_before(start), counts[c] + extras_before(end))
            units.append(Unit(len(units), c, g, labels[c], names[c], finals,
                              finals + tuple(c + C * t for t in extra_t)))
    return Plan(n=n, classes=names, labels=labels, counts=counts, keep_top=keep_top,
                ext=fmt, units=tuple(units))


def select(unit: Unit, scores: dict[int, float] | None, dropped: set[int], keep_top: float | None
           ) -> tuple[dict[int, int], dict[int, str]]:
    """Filter decisions for one unit -> ({latent: final index} kept, {latent: reason} rejected).

    Dedup-dropped candidates go first; with keep-top the best len(finals) survivors by D score are kept
    (ties: lower latent index). Kept primaries keep their own index; kept extras fill the vacated indices
    in ascending order of both.
    """
    survivors = [c for c in unit.candidates if c not in dropped]
    if keep_top is not None:
        assert scores is not None

        def rank(c: int) -> tuple[float, int]:
            s = scores[c]
            return (-s if s == s else math.inf, c)  # NaN ranks last

        kept = set(sorted(survivors, key=rank)[:len(unit.finals)])
    else:
        kept = set(survivors)
    finals = set(unit.finals)
    assign = {c: c for c in kept if c in finals}
    free = iter(sorted(finals - set(assign)))
    for c in sorted(kept - set(assign)):
        assign[c] = next(free)
    rejected = {c: ("dedup" if c in dropped else "keep-top") for c in unit.candidates if c not in kept}
    return assign, rejected


# ----------------------------------------------------------------------------------------------------
# Files: encoding, atomic writes, validation.

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
        raise UserError(f"unknown format {fmt!r}")
    return buf.getvalue()


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
# Folder descriptors for name-relative open/rename (POSIX); elsewhere every call takes the full path.
_DIR_FDS = hasattr(os, "O_DIRECTORY") and {os.open, os.rename, os.unlink} <= os.supports_dir_fd


def write_atomic(path: str | os.PathLike, data: bytes, dir_fd: int | None = None) -> None:
    """Write one image file through `<name>.tmp-<pid>` in the same folder and a rename.

    The per-image fast path of `augment_gan.atomic.write_bytes_atomic(durable=False)`: plain os calls, no
    Path or file objects and no unlink probe cost 35 instead of 123 us of CPU per file (tmpfs, measured),
    about 9% of generating a 32px image. With `dir_fd` (an open descriptor of the folder) `path` is a bare
    file name, so the kernel does not walk the whole path again for the open and the rename. No fsync:
    this protects against a killed process (the case resume handles), not against power loss; manifests and
    synth.json are written durably.
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
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


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
    if not _DIR_FDS:
        for data, path in zip(files, paths):
            write_atomic(path, data)
        return len(paths)
    folders: dict[str, int] = {}  # folder -> open descriptor, for name-relative opens and renames
    try:
        for data, path in zip(files, paths):
            folder, name = os.path.split(path)
            if folder not in folders:
                folders[folder] = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
            write_atomic(name, data, dir_fd=folders[folder])
    finally:
        for fd in folders.values():
            os.close(fd)
    return len(paths)


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
# Dedup: nearest training image.

class DedupIndex:
    """Distances from images to their nearest training image, in 16×16 pixel space.

    Feature: the image in [-1, 1] area-downsampled to 16×16, distance = RMS pixel difference. A memorised
    copy is a pixel-level near-duplicate; downsampling ignores the high-frequency noise G adds, and the
    measure does not depend on how far D has trained (D's features move during training and are trained
    to ignore the augmentations we apply to reals), so one threshold rule works for every checkpoint.
    Threshold: the `percentile` (1st) of real-to-real nearest-neighbour distances, at least one grey level.
    """

    def __init__(self, real: Any, percentile: float = DEDUP_PERCENTILE, max_queries: int = 5000):
        import torch

        self.features = self.embed(real)
        n = len(self.features)
        if n < 2:
            raise UserError("--dedup needs at least 2 training images to calibrate its threshold")
        # Calibrate on at most `max_queries` reals against all of them (bounded cost on large folders).
        queries = torch.arange(n)
        if n > max_queries:
            queries = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_queries]
        self.real_nn = self._nearest(self.features[queries], exclude=queries)
        self.percentile = percentile
        self.threshold = max(float(np.percentile(self.real_nn.numpy(), percentile)), DEDUP_MIN_THRESHOLD)

    @staticmethod
    def embed(images: Any) -> Any:
        """uint8 N×C×H×W -> float N×(C·16·16), scaled so that L2 distance is the RMS pixel difference."""
        import torch.nn.functional as F

        from augment_gan.pixels import to_float

        x = F.adaptive_avg_pool2d(to_float(images), DEDUP_SIZE).flatten(1)
        return x / math.sqrt(x.shape[1])

    def _nearest(self, queries: Any, exclude: Any = None, chunk: int = 1024) -> Any:
        import torch

        out = []
        sq_real = (self.features ** 2).sum(1)
        for start in range(0, len(queries), chunk):
            q = queries[start:start + chunk]
            # Squared distances by matmul find the neighbour fast; the distance itself is then recomputed
            # exactly, so an exact copy measures 0 rather than matmul round-off.
            d2 = (q ** 2).sum(1, keepdim=True) - 2 * q @ self.features.T + sq_real[None]
            if exclude is not None:
                rows = torch.arange(len(q))
                d2[rows, exclude[start:start + chunk]] = math.inf
            nearest = d2.argmin(1)
            out.append((q - self.features[nearest]).norm(dim=1))
        return torch.cat(out)

    def distances(self, images: Any) -> Any:
        """uint8 N×C×H×W -> float N: distance to the nearest training image."""
        return self._nearest(self.embed(images))


def _dedup_root(ckpt: Any, dedup_real: str | None) -> Path:
    if dedup_real is not None:
        root = Path(dedup_real)
        if not root.is_dir():
            raise UserError(f"--dedup-real: folder not found: {root}")
        return root.resolve()
    recorded = (ckpt.meta.get("data") or {}).get("root")
    if not recorded:
        raise UserError("--dedup needs the training images: the checkpoint records no folder, pass --dedup-real DIR")
    if not Path(recorded).is_dir():
        raise UserError(f"--dedup needs the training images: {recorded} (recorded in the checkpoint) no longer "
                        "exists; pass --dedup-real DIR")
    return Path(recorded)


def load_dedup_index(ckpt: Any, root: Path, progress: bool) -> DedupIndex:
    """Read the training folder the way `fit` read it and build the index."""
    from augment_gan.data import ReadOptions, load_folder
    from augment_gan.pixels import hwc_to_nchw

    options = ReadOptions(resolution=ckpt.resolution, fit=ckpt.config.fit,
                          background=tuple(ckpt.config.background),
                          channels="gray" if ckpt.channels == 1 else "rgb")
    images = load_folder(root, options, progress=progress)
    return DedupIndex(hwc_to_nchw(images.images))


# ----------------------------------------------------------------------------------------------------
# The output folder: settings, overwrite rules, manifests.

def _settings(ckpt: Any, plan: Plan, config: SynthConfig, dedup_real: Path | None) -> dict[str, Any]:
    from augment_gan.sample import LATENT_SCHEME

    return {
        "layout_version": LAYOUT_VERSION,
        "package_version": __version__,
        "checkpoint": {"path": str(Path(ckpt.path).resolve()), "digest": ckpt.digest},
        "classes": list(ckpt.classes) if ckpt.num_classes else [],
        "conditional": bool(ckpt.num_classes),
        "selected_classes": [c for c in plan.classes if c is not None],
        "counts": list(plan.counts),
        "n": plan.n,
        "seed": config.seed,
        "truncation": config.truncation,
        "truncation_method": "psi: z * psi (the prior's mean is 0)",
        "latent_scheme": LATENT_SCHEME,
        "format": config.format,
        "quality": config.quality or DEFAULT_QUALITY[config.format],
        "png_compressor": PNG_COMPRESSOR if config.format == "png" else None,
        "resolution": ckpt.resolution,
        "channels": ckpt.channels,
        "group_size": GROUP_SIZE,
        "filters": {
            "keep_top": config.keep_top,
            "dedup": config.dedup,
            "dedup_real": str(dedup_real) if dedup_real else None,
            "dedup_feature": f"pixels {DEDUP_SIZE}x{DEDUP_SIZE}, RMS difference in [-1, 1]" if config.dedup else None,
            "dedup_percentile": DEDUP_PERCENTILE if config.dedup else None,
            "dedup_threshold": None,
        },
    }


_IDENTITY = ("layout_version", "classes", "conditional", "selected_classes", "counts", "n", "seed",
             "truncation", "latent_scheme", "format", "quality", "group_size")


def _identity(settings: dict[str, Any]) -> dict[str, Any]:
    filters = settings.get("filters") or {}
    return {**{k: settings.get(k) for k in _IDENTITY},
            "checkpoint": (settings.get("checkpoint") or {}).get("digest"),
            "keep_top": filters.get("keep_top"), "dedup": filters.get("dedup"),
            "dedup_real": filters.get("dedup_real")}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def _visible_entries(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if not p.name.startswith(".") and ".tmp-" not in p.name]


def check_out_folder(out: Path, settings_name: str, settings: dict[str, Any], identity: Any,
                     overwrite: bool) -> dict[str, Any] | None:
    """Refuse a folder we may not write into; return its old settings file when it has one.

    An empty or missing folder is fine; a non-empty one must hold `settings_name` with the same
    `identity(settings)` (a resume) unless `overwrite`.
    """
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link; give the real folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not _visible_entries(out):
        return None
    old = _read_json(out / settings_name)
    if old is None:
        if not overwrite:
            raise UserError(f"{out} is not empty and holds no {settings_name}; "
                            "choose another --out or pass --overwrite")
        return None
    before, after = identity(old), identity(settings)
    if before != after and not overwrite:
        diffs = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in after if before.get(k) != after.get(k)]
        shown = "; ".join(d if len(d) < 120 else d[:117] + "..." for d in diffs[:3])
        raise UserError(f"{out} holds images made with other settings ({shown}); "
                        "pass --overwrite to replace them or choose another --out")
    return old


def _clear_old_set(out: Path, old: dict[str, Any]) -> None:
    """Remove the files a previous synth with other settings wrote (only names synth itself uses)."""
    folders = [out]
    for name in old.get("selected_classes") or []:
        try:
            folders.append(out / check_class_name(name))
        except UserError:
            continue
    for folder in folders:
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in folder.iterdir():
            if _IMAGE_NAME.match(p.name) or _IMAGE_TMP.match(p.name):
                p.unlink(missing_ok=True)
        if folder != out:
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: the user keeps what else is in there
    for p in out.iterdir():
        if p.name == MANIFEST or re.match(r"^manifest(\.shard-\d+-of-\d+)?\.jsonl(\.partial|\.tmp-.+)?$", p.name):
            p.unlink(missing_ok=True)


def _shard_manifest_name(shard: tuple[int, int]) -> str:
    return MANIFEST if shard[1] == 1 else f"manifest.shard-{shard[0]}-of-{shard[1]}.jsonl"


def _journal_name(shard: tuple[int, int]) -> str:
    return _shard_manifest_name(shard) + ".partial"


def _clean_stale_tmp(out: Path, plan: Plan, shard: tuple[int, int]) -> None:
    """Remove temporary files a killed run left behind, only where no other running shard can be writing."""
    for folder in [out, *(out / c for c in plan.classes if c is not None)]:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            match = _IMAGE_TMP.match(p.name)
            if match:
                unit = plan.unit_of_final(int(match.group(1)))
                if unit is None or unit.position % shard[1] == shard[0]:
                    p.unlink(missing_ok=True)
            elif folder == out and ".tmp-" in p.name:
                own = p.name.startswith(_shard_manifest_name(shard) + ".")
                if shard[1] == 1 or own:
                    p.unlink(missing_ok=True)


def _manifest_files(out: Path) -> list[Path]:
    found = [out / MANIFEST] + sorted(out.glob("manifest.shard-*-of-*.jsonl")) + sorted(out.glob("manifest*.jsonl.partial"))
    return [p for p in found if p.is_file()]


def _row(unit: Unit, common: dict[str, Any], *, latent: int, index: int | None, file: str | None,
         d_score: float | None, nn_distance: float | None, kept: bool, reason: str | None) -> dict[str, Any]:
    # The key order is fixed so manifests are byte-identical across runs and shards.
    return {"file": file, "index": index, "seed": common["seed"], "class": unit.class_name, "label": unit.label,
            "truncation": common["truncation"], "checkpoint": common["checkpoint"], "d_score": d_score,
            "kept": kept, "filter": reason, "latent": latent, "nn_distance": nn_distance}


def _load_rows(out: Path, plan: Plan, common: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Manifest rows already on disk (any shard, journals included) that fit this plan, by latent index."""
    unit_of: dict[int, Unit] = {c: u for u in plan.units for c in u.candidates}
    rows: dict[int, dict[str, Any]] = {}
    for path in _manifest_files(out):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the last line of a killed run's journal may be cut short
            if not isinstance(row, dict):
                continue
            latent = row.get("latent")
            unit = unit_of.get(latent) if isinstance(latent, int) and not isinstance(latent, bool) else None
            if unit is None or any(row.get(k) != v for k, v in common.items()):
                continue
            if row.get("class") != unit.class_name or row.get("label") != unit.label:
                continue
            d_score, nn = row.get("d_score"), row.get("nn_distance")
            if not all(v is None or isinstance(v, (int, float)) for v in (d_score, nn)):
                continue
            if row.get("kept") is True:
                index = row.get("index")
                if index not in unit.finals or row.get("file") != plan.relpath(unit, index) or row.get("filter") is not None:
                    continue
                rows[latent] = _row(unit, common, latent=latent, index=index, file=row["file"], d_score=d_score,
                                    nn_distance=nn, kept=True, reason=None)
            elif row.get("kept") is False and row.get("filter") in ("keep-top", "dedup"):
                if row.get("file") is not None or row.get("index") is not None:
                    continue
                rows[latent] = _row(unit, common, latent=latent, index=None, file=None, d_score=d_score,
                                    nn_distance=nn, kept=False, reason=row["filter"])
    return rows


def _unit_rows_from_cache(unit: Unit, cache: dict[int, dict[str, Any]], present: Any) -> list[dict] | None:
    """A filtered unit's rows when all its candidates are decided and its kept files are present."""
    rows = [cache.get(c) for c in unit.candidates]
    if any(r is None for r in rows):
        return None
    kept = [r for r in rows if r["kept"]]
    if len({r["index"] for r in kept}) != len(kept) or not all(present(r["file"]) for r in kept):
        return None
    return rows  # type: ignore[return-value]


def _plain_row(plan: Plan, unit: Unit, index: int, common: dict[str, Any]) -> dict[str, Any]:
    return _row(unit, common, latent=index, index=index, file=plan.relpath(unit, index), d_score=None,
                nn_distance=None, kept=True, reason=None)


def _sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (0, r["index"]) if r["kept"] else (1, r["latent"]))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSON lines, atomically and durably."""
    write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    write_jsonl(path, _sort_rows(rows))


def _try_merge(out: Path, plan: Plan, common: dict[str, Any], filtered: bool) -> Path | None:
    """Write manifest.jsonl when every unit of the set (all shards) is done; else return None."""
    cache = _load_rows(out, plan, common) if filtered else {}
    rows: list[dict[str, Any]] = []
    for unit in plan.units:
        if filtered:
            unit_rows = _unit_rows_from_cache(unit, cache, lambda f: (out / f).is_file())
            if unit_rows is None:
                return None
            rows += unit_rows
        else:
            for index in unit.finals:
                if not (out / plan.relpath(unit, index)).is_file():
                    return None
                rows.append(_plain_row(plan, unit, index, common))
    _write_manifest(out / MANIFEST, rows)
    return out / MANIFEST


# ----------------------------------------------------------------------------------------------------
# The run.

def pick_device(name: str) -> Any:
    import torch

    from augment_gan.device import resolve_device

    device = resolve_device(name)
    # Under torchrun each rank takes its own GPU.
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


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


def synth(checkpoint: Any, out: str | Path, config: SynthConfig) -> SynthSummary:
    """Write (this shard of) a synthetic set to `out`; returns what was done.

    `checkpoint` is a run directory, a checkpoint file, or an already loaded `Checkpoint`.
    """
    import torch
    from tqdm import tqdm

    from augment_gan import sample
    from augment_gan.pixels import to_float, to_uint8

    t_start = time.perf_counter()
    shard = config.shard or shard_from_env()
    device = pick_device(config.device)

    # Load the checkpoint and plan the set.
    if hasattr(checkpoint, "G_ema"):
        ckpt = checkpoint
    else:
        from augment_gan.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, device=device)
    ckpt.G_ema.to(device)
    if config.keep_top is not None:
        ckpt.D.to(device)
    plan = make_plan(ckpt.classes, ckpt.num_classes, n=config.n, per_class=config.per_class,
                     classes=config.classes, keep_top=config.keep_top, fmt=config.format)
    out = Path(out)
    dedup_root = _dedup_root(ckpt, config.dedup_real) if config.dedup else None
    settings = _settings(ckpt, plan, config, dedup_root)
    old = check_out_folder(out, SETTINGS, settings, _identity, config.overwrite)
    dedup = load_dedup_index(ckpt, dedup_root, config.progress) if dedup_root is not None else None
    if dedup is not None:
        settings["filters"]["dedup_threshold"] = dedup.threshold
    filtered = config.keep_top is not None or config.dedup
    common = {"seed": config.seed, "truncation": config.truncation, "checkpoint": ckpt.digest}
    batch_size = config.batch_size or default_batch_size(ckpt.resolution)
    workers = config.workers or default_workers(device.type)
    lanes, threads = default_lanes(device.type, config.lanes, config.threads)

    # Prepare the folder: clear a replaced set, remove stale temporaries, record the settings.
    out.mkdir(parents=True, exist_ok=True)
    if old is not None and _identity(old) != _identity(settings):
        _clear_old_set(out, old)  # only reached with --overwrite
        old = None
    _clean_stale_tmp(out, plan, shard)
    if old is None or old != settings:
        _write_json(out / SETTINGS, settings)
    if config.overwrite:
        for name in (MANIFEST, _shard_manifest_name(shard), _journal_name(shard)):
            (out / name).unlink(missing_ok=True)
    for name, count in zip(plan.classes, plan.counts):
        if name is not None and count:  # no empty class folders: ImageFolder rejects them
            folder = out / name
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise UserError(f"{folder} exists and is not a plain folder; refusing to write through it")
            folder.mkdir(exist_ok=True)

    owned = plan.owned(shard)
    out_str = str(out)
    writer_rows: list[dict[str, Any]] = []
    counts = {"written": 0, "existing": 0}
    journal = None
    bar = None
    ok = False
    # Which files exist and decode (resume); a broken or foreign file is simply regenerated. Listing the
    # folders first keeps a fresh run from probing every planned name.
    valid: dict[int, bool] = {}
    if not config.overwrite:
        present = set()
        for folder in {os.path.dirname(plan.relpath(u, u.finals[0])) for u in owned}:
            with os.scandir(os.path.join(out_str, folder)) as entries:
                present.update(f"{folder}/{e.name}" if folder else e.name for e in entries)
        finals = [(i, rel) for u in owned for i in u.finals if (rel := plan.relpath(u, i)) in present]
        with cf.ThreadPoolExecutor(max_workers=max(workers, 2)) as checker:
            checks = checker.map(readable_image, [out / rel for _, rel in finals], [ckpt.resolution] * len(finals))
            valid = {i: ok_ for (i, _), ok_ in zip(finals, checks)}
    cache = _load_rows(out, plan, common) if filtered and not config.overwrite else {}
    jobs: list[tuple[Unit, list[int]]] = []
    for unit in owned:
        if not filtered:
            missing = [i for i in unit.finals if not valid.get(i)]
            writer_rows += [_plain_row(plan, unit, i, common) for i in unit.finals if valid.get(i)]
            counts["existing"] += len(unit.finals) - len(missing)
            if missing:
                jobs.append((unit, missing))
        else:
            unit_rows = _unit_rows_from_cache(unit, cache, lambda f: valid.get(int(Path(f).stem), False))
            if unit_rows is None:
                jobs.append((unit, list(unit.candidates)))
            else:
                writer_rows += unit_rows
                counts["existing"] += sum(r["kept"] for r in unit_rows)

    def on_done(rows: list[dict[str, Any]]) -> None:
        writer_rows.extend(rows)
        if journal is not None:
            journal.write("".join(json.dumps(r) + "\n" for r in rows))
            journal.flush()
        if bar is not None:
            bar.update(sum(r["kept"] for r in rows))

    todo = sum(len(cands) if not filtered else len(unit.finals) for unit, cands in jobs)
    bar = tqdm(total=todo, desc=f"synth {shard[0]}/{shard[1]}" if shard[1] > 1 else "synth", unit="img",
               file=sys.stderr, disable=not config.progress or todo == 0, dynamic_ncols=True)
    writer = ImageWriter(workers, config.format, config.quality, on_done, config.pool)
    # The journal holds filter decisions as they are made, so a killed filtered run keeps them for resume.
    journal = open(out / _journal_name(shard), "a") if filtered else None
    t_loop = time.perf_counter()
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    prefetch = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="synth-latents")
    generator = cf.ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="synth-g")
    running: deque = deque()  # (labels, generator future) per batch, oldest first
    try:
        stream = [(unit, latent) for unit, cands in jobs for latent in cands]
        starts = range(0, len(stream), batch_size)
        buffers: dict[int, dict[str, dict[int, Any]]] = {}

        def batch_latents(start: int) -> Any:  # what sample.generate does before G, ψ included
            ids = [latent for _, latent in stream[start:start + batch_size]]
            return sample.latents(config.seed, ids, ckpt.z_dim) * config.truncation

        def batch_labels(start: int) -> list[int] | None:
            return [unit.label for unit, _ in stream[start:start + batch_size]] if ckpt.num_classes else None

        # Latents are drawn on their own thread, one batch ahead; `lanes` generator forwards run at once on
        # the lane threads (float N×C×H×W on the device) and are consumed in order here.
        next_z = prefetch.submit(batch_latents, 0) if stream else None
        submitted = 0
        for start in starts:
            while submitted < len(starts) and len(running) < lanes:
                s_start = starts[submitted]
                z = next_z.result()
                if s_start + batch_size < len(stream):
                    next_z = prefetch.submit(batch_latents, s_start + batch_size)
                labels = batch_labels(s_start)
                running.append((labels, generator.submit(sample.decode_float, ckpt, z, labels, device=device)))
                submitted += 1
            batch = stream[start:start + batch_size]
            labels, future = running.popleft()
            images = future.result()
            if not filtered:
                # On a CPU the uint8 conversion happens on the encoder threads, off G's critical path.
                images = images if device.type == "cpu" else to_uint8(images).cpu()
                paths = [os.path.join(out_str, plan.relpath(unit, latent)) for unit, latent in batch]
                rows = [_plain_row(plan, unit, latent, common) for unit, latent in batch]
                counts["written"] += len(paths)
                writer.submit(images, paths, rows)
                continue
            images = to_uint8(images).cpu()  # uint8 N×C×H×W: filters judge exactly the bytes written
            scores = nn = None
            if config.keep_top is not None:
                y = torch.tensor(labels, device=device) if labels is not None else None
                with torch.inference_mode():
                    scores = sample.aligned_forward(ckpt.D, to_float(images.to(device)), y).float().cpu().tolist()
            if dedup is not None:
                nn = dedup.distances(images).tolist()
            for k, (unit, latent) in enumerate(batch):
                buf = buffers.setdefault(unit.position, {"image": {}, "score": {}, "nn": {}})
                buf["image"][latent] = images[k]
                buf["score"][latent] = None if scores is None else round(scores[k], 6)
                buf["nn"][latent] = None if nn is None else round(nn[k], 6)
                if len(buf["image"]) < len(unit.candidates):
                    continue
                del buffers[unit.position]
                dropped = {c for c, d in buf["nn"].items() if d is not None and d < dedup.threshold}  # type: ignore[union-attr]
                assign, rejected = select(unit, buf["score"], dropped, config.keep_top)
                on_done([_row(unit, common, latent=c, index=None, file=None, d_score=buf["score"][c],
                              nn_distance=buf["nn"][c], kept=False, reason=reason) for c, reason in rejected.items()])
                kept, paths, rows, skip_rows = [], [], [], []
                for c, index in sorted(assign.items(), key=lambda kv: kv[1]):
                    rel = plan.relpath(unit, index)
                    row = _row(unit, common, latent=c, index=index, file=rel, d_score=buf["score"][c],
                               nn_distance=buf["nn"][c], kept=True, reason=None)
                    if valid.get(index) and not config.overwrite:
                        skip_rows.append(row)  # same settings, so the file already holds these bytes
                    else:
                        kept.append(buf["image"][c])
                        paths.append(os.path.join(out_str, rel))
                        rows.append(row)
                counts["existing"] += len(skip_rows)
                counts["written"] += len(paths)
                on_done(skip_rows)
                writer.submit(torch.stack(kept) if kept else None, paths, rows)
        writer.drain()
        ok = True
    finally:
        for _, future in running:
            future.cancel()
        generator.shutdown(wait=True)
        torch.set_num_threads(saved_threads)
        prefetch.shutdown(wait=True)
        writer.close(ok)
        bar.close()
        if journal is not None:
            journal.close()
    loop_seconds = time.perf_counter() - t_loop

    # Manifests: this shard's, then the merged one if every shard is done.
    shard_manifest = out / _shard_manifest_name(shard)
    _write_manifest(shard_manifest, writer_rows)
    (out / _journal_name(shard)).unlink(missing_ok=True)
    merged = shard_manifest if shard[1] == 1 else _try_merge(out, plan, common, filtered)

    kept_rows = [r for r in writer_rows if r["kept"]]
    planned = sum(len(u.finals) for u in owned)
    seconds = time.perf_counter() - t_start
    return SynthSummary(
        out=str(out), shard=shard, planned=planned, written=counts["written"], existing=counts["existing"],
        images=len(kept_rows), missing=planned - len(kept_rows),
        dropped_keep_top=sum(r["filter"] == "keep-top" for r in writer_rows),
        dropped_dedup=sum(r["filter"] == "dedup" for r in writer_rows),
        dedup_threshold=dedup.threshold if dedup is not None else None,
        manifest=str(merged) if merged else None, seconds=round(seconds, 3),
        images_per_second=round(counts["written"] / loop_seconds, 2) if loop_seconds > 0 and counts["written"] else 0.0,
        workers=workers, threads=threads, lanes=lanes, batch_size=batch_size, device=str(device),
        shard_manifest=str(shard_manifest) if shard[1] > 1 else None)
