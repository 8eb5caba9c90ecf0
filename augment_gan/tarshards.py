"""Tar shards of a synthetic set (`synth --format tar`): their names, the member layout, the writer and the
index a dataset reads them through.

A set written with `--format tar` holds `OUT/shard-000000.tar`, `shard-000001.tar`, ... instead of image
files. Shard t holds the plan's units t·U .. t·U + U - 1 (U = images_per_tar / 256, see `augment_gan.plan`),
and for each kept image, in unit order, one webdataset sample: the members `<index>.png` (the image),
`<index>.json` (its manifest row, `augment_gan.manifest`) and, in a class-conditional set, `<index>.cls` (its
label: the checkpoint's class index, in decimal). `webdataset.WebDataset(urls).decode("pil").to_tuple("png",
"cls")` reads them as they are; `augment_gan.tardataset.SyntheticTarDataset` gives indexed access.

A shard is written as `shard-000000.tar.tmp-<pid>` and renamed when complete, so it exists whole or not at
all; resume regenerates the shards that do not exist. Headers are plain ustar with fixed metadata (mtime 0,
mode 0644, owner 0), so a shard's bytes are a function of its images, as a per-file set's are.

Why tar: on this project's VM an ext4 file costs 83-145 us of CPU to create, which held per-file `synth` to
66% of the generator at 32 px; appending to one open file costs a few microseconds (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import os
import re
from collections import deque
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

TAR_FORMAT = "tar"
"""`synth --format tar`: PNG images in tar shards."""
TAR_IMAGE_FORMAT = "png"
"""The image format inside the shards (lossless, and the fastest encoder synth has)."""
DEFAULT_IMAGES_PER_TAR = 10_240
"""Images per shard (40 units of 256): 25-35 MB at 32 px, ~100 MB at 64 px RGB, in the range webdataset's
authors recommend for sequential reads, and about 100 shards for a million images to split over processes."""
SHARD_NAME = re.compile(r"^shard-(\d{6,})\.tar$")
SHARD_TMP = re.compile(r"^shard-(\d{6,})\.tar\.tmp-.+$")
"""A shard's temporary file while it is written."""

_BLOCK = 512
_END = bytes(2 * _BLOCK)  # a tar archive ends with two zero blocks


def shard_name(t: int) -> str:
    """The file name of tar shard t."""
    return f"shard-{t:06d}.tar"


# ----------------------------------------------------------------------------------------------------
# Members.

def _template() -> bytearray:
    h = bytearray(_BLOCK)
    h[100:108] = b"0000644\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"00000000000\0"  # mtime: 0, so the bytes depend on the contents only
    h[148:156] = b" " * 8  # the checksum field counts as spaces while the checksum is computed
    h[156:157] = b"0"  # a regular file
    h[257:265] = b"ustar\x0000"
    return h


_TEMPLATE = bytes(_template())
_TEMPLATE_SUM = sum(_TEMPLATE)
_IDS, _MTIME, _REST = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]


def tar_member(name: str, data: bytes) -> bytes:
    """One regular-file member of a ustar archive: header, data, zero padding to a whole block."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size = b"%011o\0" % len(data)
    # The checksum is the byte sum of the header with its own field as spaces; only the name and the size
    # differ from the template, where they are zeros.
    checksum = b"%06o\0 " % (_TEMPLATE_SUM + sum(raw) + sum(size))
    return b"".join((raw.ljust(100, b"\0"), _IDS, size, _MTIME, checksum, _REST, data, bytes(-len(data) % _BLOCK)))


def complete_tar(path: Path) -> bool:
    """A shard that was written to its end: whole blocks, ending in the two zero blocks of an archive. (The
    rename makes this true of every shard a killed run leaves; it guards against a file cut short later.)"""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < len(_END) or size % _BLOCK:
                return False
            f.seek(size - len(_END))
            return f.read() == _END
    except OSError:
        return False


def read_shard(path: Path, contents: tuple[str, ...] = ()) -> list[tuple[str, int, int, bytes | None]]:
    """The regular-file members of a tar shard, in order: (name, data offset, data size, data), with the data
    of members whose name ends with one of `contents` (e.g. ".cls"), else None."""
    with open(path, "rb") as f:
        buf = f.read()
    members = []
    pos, end = 0, len(buf)
    while pos + _BLOCK <= end:
        header = buf[pos:pos + _BLOCK]
        if header[0] == 0:  # the end-of-archive blocks
            break
        size_field = header[124:136].strip(b"\0 ")
        size = int(size_field, 8) if size_field else 0
        if header[156:157] in (b"0", b"\0"):  # a regular file (pax or GNU extension headers are skipped)
            name = header[:100].rstrip(b"\0").decode()
            start = pos + _BLOCK
            members.append((name, start, size, buf[start:start + size] if name.endswith(contents) else None))
        pos += _BLOCK + size + (-size % _BLOCK)
    return members


# ----------------------------------------------------------------------------------------------------
# Writing.

def _encode(images: Any) -> list[bytes]:
    """CPU tensor N×C×H×W (float in [-1, 1] or uint8) or numpy uint8 N×H×W×C -> one PNG file each."""
    from augment_gan.imagefile import _hwc_uint8, png_files

    return png_files(images if isinstance(images, np.ndarray) else _hwc_uint8(images))


class TarWriter:
    """Writes a synth run's images into its tar shards: the same calls as `imagefile.ImageWriter`.

    PNGs are encoded in a thread pool, a bounded number of chunks ahead; members are appended in submission
    order by the caller's thread (in `drain`), so a shard's bytes do not depend on thread timing. `tars` are
    the shards this run writes, in the order their images come; each is finished (renamed into place) once
    images of a later one arrive, or at `close`, also when none of its images survived the filters.
    """

    def __init__(self, out: Path, tars: list[str], workers: int, on_done: Any):
        self.out, self.todo, self.on_done = Path(out), deque(tars), on_done
        self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth-tar")
        self.workers = workers
        self.inflight: deque = deque()
        self.max_inflight = 2 * workers
        self.current: str | None = None
        self.file: BinaryIO | None = None

    def submit(self, images: Any, paths: list[str], payload: list[Any]) -> None:
        """Append `images` (CPU tensor N×C×H×W, float or uint8) with their manifest rows `payload`, as the
        members `paths` (OUT/<shard>/<index>.png: each row's `file`); `on_done(payload)` once appended."""
        if not paths:
            self.on_done(payload)
            return
        size = math.ceil(len(paths) / self.workers)
        for start in range(0, len(paths), size):
            future = self.pool.submit(_encode, images[start:start + size])
            self.inflight.append((future, payload[start:start + size]))
        self.drain(self.max_inflight)

    def drain(self, limit: int = 0) -> None:
        while len(self.inflight) > limit:
            future, rows = self.inflight.popleft()
            files = future.result()
            parts: list[bytes] = []
            for data, row in zip(files, rows):
                tar, name = row.file.split("/")  # its `Plan.relpath`: <shard>/<index>.png, as in `paths`
                if tar != self.current:
                    self._write(parts)
                    parts = []
                    self._open(tar)
                stem = name.rsplit(".", 1)[0]
                parts += [tar_member(name, data), tar_member(f"{stem}.json", row.to_line().encode())]
                if row.label is not None:
                    parts.append(tar_member(f"{stem}.cls", b"%d" % row.label))
            self._write(parts)
            self.on_done(rows)

    def _write(self, parts: list[bytes]) -> None:
        if parts:
            self.file.write(b"".join(parts))  # type: ignore[union-attr]

    def _tmp(self, tar: str) -> Path:
        return self.out / f"{tar}.tmp-{os.getpid()}"

    def _open(self, tar: str) -> None:
        """Finish the shard being written and every planned one before `tar` (they hold no image), open `tar`."""
        self._finish()
        while self.todo and self.todo[0] != tar:
            self.current = self.todo.popleft()
            self.file = open(self._tmp(self.current), "wb")
            self._finish()
        if not self.todo:
            raise RuntimeError(f"images for {tar}, which this run does not write (or wrote already)")
        self.current = self.todo.popleft()
        self.file = open(self._tmp(self.current), "wb", buffering=1 << 20)

    def _finish(self) -> None:
        if self.file is None or self.current is None:
            return
        self.file.write(_END)
        self.file.close()  # no fsync: like image files, a shard survives a killed process, not power loss
        os.replace(self._tmp(self.current), self.out / self.current)
        self.file, self.current = None, None

    def close(self, ok: bool) -> None:
        try:
            if ok:
                self.drain()
                self._finish()
                while self.todo:
                    self._open(self.todo[0])
                self._finish()
        finally:
            for future, _ in self.inflight:
                future.cancel()
            self.pool.shutdown(wait=True)
            if self.file is not None and self.current is not None:  # a failed run: its unfinished shard
                self.file.close()                                       # goes; resume writes it again
                self._tmp(self.current).unlink(missing_ok=True)
                self.file, self.current = None, None
