"""The manifest of a generated folder: one JSON line per image (or rejected candidate), its one row type,
reader and writer.

`synth` and `vary` write it; `SyntheticImageFolder`, `evaluate` and `merge` read it. Every row has every
key of `ManifestRow` (null where a field does not apply), in a fixed order, so a manifest's bytes are a
function of its rows. Rows carry `version`; rows without it (written before it existed) have the same
meaning and read as version 0.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from augment_gan.atomic import write_bytes_atomic
from augment_gan.errors import UserError

MANIFEST = "manifest.jsonl"
"""The manifest's file name inside a generated folder."""
VERSION = 1
REQUIRED_KEYS = ("file", "class", "label", "kept")
"""Keys every row must have, in every version: what a reader needs to find and label an image."""
# Every file of the manifest family: the merged manifest, a shard's, a shard's journal and their temporaries.
_FAMILY = re.compile(r"^manifest(\.shard-\d+-of-\d+)?\.jsonl(\.partial|\.tmp-.+)?$")


@dataclass(frozen=True)
class ManifestRow:
    """One image of a generated folder, or one candidate a filter rejected (`kept` false, `file` null)."""

    file: str | None
    """Path relative to the folder, '/'-separated (in a `synth --format tar` set: `<shard>.tar/<member>`); None
    for a rejected candidate that was never written."""
    index: int | None
    """Final index of the image (synth: its name; vary: source position × n + k); None when rejected."""
    seed: int
    class_name: str | None
    """The class (folder) name, "class" in JSON; None when unconditional."""
    label: int | None
    """Index of `class_name` in the checkpoint's classes."""
    checkpoint: str
    """sha256 of the checkpoint file."""
    truncation: float | None = None
    d_score: float | None = None
    """Discriminator logit (synth --keep-top)."""
    kept: bool = True
    filter: str | None = None
    """Why a candidate was rejected: "keep-top", "dedup" or "label-confidence"; None when kept."""
    latent: int | None = None
    """synth: the latent index the image was drawn from."""
    nn_distance: float | None = None
    """synth --dedup: distance to the nearest training image."""
    source: str | None = None
    """vary: the source image, relative to the source folder."""
    k: int | None = None
    """vary: the variation's number."""
    sigma: float | None = None
    posterior_std: float | None = None
    partner: str | None = None
    """vary --interpolate: the same-class source image interpolated toward (written only when set)."""
    mix: float | None = None
    """vary --interpolate: the position on the segment from `source` (0) to `partner` (1)."""
    confidence: float | None = None
    """synth --label-with: the labelling classifier's softmax probability of `class_name` (written only when set)."""
    version: int = VERSION
    line: int | None = field(default=None, compare=False, repr=False)
    """Line number in the file it was read from (for error messages; never written)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (fixed key order: manifests are byte-identical across runs, shards and resumes)."""
        return {"version": self.version, "file": self.file, "index": self.index, "seed": self.seed,
                "class": self.class_name, "label": self.label, "truncation": self.truncation,
                "checkpoint": self.checkpoint, "d_score": self.d_score, "kept": self.kept, "filter": self.filter,
                "latent": self.latent, "nn_distance": self.nn_distance, "source": self.source, "k": self.k,
                "sigma": self.sigma, "posterior_std": self.posterior_std,
                **({"partner": self.partner, "mix": self.mix} if self.partner is not None else {}),
                **({"confidence": self.confidence} if self.confidence is not None else {})}

    def to_line(self) -> str:
        return json.dumps(self.to_dict()) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], line: int | None = None) -> "ManifestRow":
        """A row from its JSON object; keys a version lacks take their defaults, unknown keys are ignored."""
        return cls(file=data.get("file"), index=data.get("index"), seed=data.get("seed"),
                   class_name=data.get("class"), label=data.get("label"), checkpoint=data.get("checkpoint"),
                   truncation=data.get("truncation"), d_score=data.get("d_score"), kept=data.get("kept"),
                   filter=data.get("filter"), latent=data.get("latent"), nn_distance=data.get("nn_distance"),
                   source=data.get("source"), k=data.get("k"), sigma=data.get("sigma"),
                   posterior_std=data.get("posterior_std"), partner=data.get("partner"), mix=data.get("mix"),
                   confidence=data.get("confidence"), version=data.get("version", 0), line=line)


def _problem(data: Any) -> str | None:
    """Why a parsed line is not a usable row, or None."""
    if not isinstance(data, dict):
        return "expected a JSON object"
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version > VERSION:
        return f"manifest version {version!r} is newer than this augment-gan reads ({VERSION}); upgrade augment-gan"
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    file = data["file"]
    if file is None and data["kept"] is False:
        return None  # a candidate a filter rejected (--keep-top/--dedup): decided, never written
    # Manifest paths must stay inside the folder: a manifest is data, not a way to read other files.
    if not isinstance(file, str) or not file or PurePosixPath(file).is_absolute() \
            or ".." in PurePosixPath(file).parts or "\\" in file:
        return f"'file' must be a relative path inside the folder, got {file!r}"
    return None


def read_manifest(path: str | Path, *, strict: bool = True) -> list[ManifestRow]:
    """The rows of a manifest file, in file order.

    strict: a line that is not valid JSON, lacks a required key, names a file outside the folder or has a
    newer version is a `UserError` naming path:line. Otherwise such lines are skipped (synth's resume
    reads journals whose last line a killed run may have cut short) and a missing file reads as no rows.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="strict" if strict else "replace").split("\n")
    except OSError:
        if strict:
            raise
        return []
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            continue
        problem = _problem(data)
        if problem is not None:
            if strict:
                raise UserError(f"{path}:{number}: {problem}")
            continue
        rows.append(ManifestRow.from_dict(data, number))
    return rows


def sort_rows(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """The manifest's order: kept images by index, then rejected candidates by latent index."""
    return sorted(rows, key=lambda r: (0, r.index) if r.kept else (1, r.latent if r.latent is not None else -1))


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> None:
    """Write rows in the manifest's order, atomically and durably."""
    write_bytes_atomic(path, "".join(r.to_line() for r in sort_rows(rows)).encode())


def shard_manifest_name(shard: tuple[int, int]) -> str:
    """The manifest synth's shard K of N writes (the manifest itself for a single process)."""
    return MANIFEST if shard[1] == 1 else f"manifest.shard-{shard[0]}-of-{shard[1]}.jsonl"


def journal_name(shard: tuple[int, int]) -> str:
    """Rows a filtered synth shard appends as it decides them, so a killed run keeps them for resume."""
    return shard_manifest_name(shard) + ".partial"


def is_manifest_file(name: str) -> bool:
    """A name of the manifest family: the manifest, a shard's manifest or journal, or their temporaries."""
    return bool(_FAMILY.match(name))


def manifest_files(folder: Path) -> list[Path]:
    """The manifest, shard manifests and journals present in `folder` (what synth's resume reads)."""
    found = [folder / MANIFEST] + sorted(folder.glob("manifest.shard-*-of-*.jsonl")) \
        + sorted(folder.glob("manifest*.jsonl.partial"))
    return [p for p in found if p.is_file()]
