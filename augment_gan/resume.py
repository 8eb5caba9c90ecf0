"""Resuming a synthetic set: what of a plan is already on disk, and the merged manifest once every shard
is done.

A final image is done when its file exists and decodes, or, with `--format tar`, when its tar shard exists
(shards are renamed into place whole); with filters, a unit is done when every candidate has a manifest row
(any shard's manifest or journal) that fits the plan and its kept files are present.
Rows found on disk are rebuilt from the plan, so a resumed set's manifest is byte-identical to an
uninterrupted one.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from augment_gan.imagefile import readable_image
from augment_gan.manifest import (
    MANIFEST,
    ManifestRow,
    manifest_files,
    read_manifest,
    shard_manifest_name,
    write_manifest,
)
from augment_gan.plan import IMAGE_TMP, Plan, Unit
from augment_gan.tarshards import SHARD_NAME, SHARD_TMP, complete_tar


@dataclass(frozen=True)
class SetRows:
    """How the manifest rows of one set are made and recognised: its plan, seed, ψ and checkpoint digest."""

    plan: Plan
    seed: int
    truncation: float
    checkpoint: str

    def row(self, unit: Unit, *, latent: int, index: int | None, d_score: float | None = None,
            nn_distance: float | None = None, reason: str | None = None) -> ManifestRow:
        """The row of one candidate: kept at final `index`, or (index None) rejected by `reason`."""
        return ManifestRow(file=None if index is None else self.plan.relpath(unit, index), index=index,
                           seed=self.seed, class_name=unit.class_name, label=unit.label, checkpoint=self.checkpoint,
                           truncation=self.truncation, d_score=d_score, kept=index is not None, filter=reason,
                           latent=latent, nn_distance=nn_distance)

    def rebuild(self, row: ManifestRow) -> ManifestRow | None:
        """A row read from disk, rebuilt from the plan when it belongs to this set, else None."""
        latent = row.latent
        unit = self._unit_of.get(latent) if isinstance(latent, int) and not isinstance(latent, bool) else None
        if unit is None or (row.seed, row.truncation, row.checkpoint) != (self.seed, self.truncation, self.checkpoint):
            return None
        if (row.class_name, row.label) != (unit.class_name, unit.label):
            return None
        if not (_number(row.d_score) and _number(row.nn_distance)):
            return None
        if row.kept is True:
            if row.index not in unit.finals or row.file != self.plan.relpath(unit, row.index) or row.filter is not None:
                return None
            return self.row(unit, latent=latent, index=row.index, d_score=row.d_score, nn_distance=row.nn_distance)
        if row.kept is False and row.filter in ("keep-top", "dedup") and row.file is None and row.index is None:
            return self.row(unit, latent=latent, index=None, d_score=row.d_score, nn_distance=row.nn_distance,
                            reason=row.filter)
        return None

    @property
    def _unit_of(self) -> dict[int, Unit]:
        cached = self.__dict__.get("_units")
        if cached is None:
            cached = {c: u for u in self.plan.units for c in u.candidates}
            object.__setattr__(self, "_units", cached)
        return cached


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def load_rows(out: Path, rows: SetRows) -> dict[int, ManifestRow]:
    """Rows already on disk (any shard, journals included) that belong to this set, by latent index."""
    found: dict[int, ManifestRow] = {}
    for path in manifest_files(out):
        for row in read_manifest(path, strict=False):  # a killed run's journal may end in a cut line
            rebuilt = rows.rebuild(row)
            if rebuilt is not None:
                found[rebuilt.latent] = rebuilt  # type: ignore[index]
    return found


def unit_rows(unit: Unit, cache: dict[int, ManifestRow], present: Callable[[str], bool]) -> list[ManifestRow] | None:
    """A filtered unit's rows when all its candidates are decided and its kept files are present."""
    rows = [cache.get(c) for c in unit.candidates]
    if any(r is None for r in rows):
        return None
    kept = [r for r in rows if r.kept]  # type: ignore[union-attr]
    if len({r.index for r in kept}) != len(kept) or not all(present(r.file) for r in kept):
        return None
    return rows  # type: ignore[return-value]


@dataclass
class Progress:
    """What a shard finds done when it starts, and what it still has to generate."""

    valid: dict[int, bool] = field(default_factory=dict)
    """Final index -> its file exists and decodes."""
    rows: list[ManifestRow] = field(default_factory=list)
    """Manifest rows of the done work."""
    existing: int = 0
    """Files kept as they are."""
    jobs: list[tuple[Unit, list[int]]] = field(default_factory=list)
    """(unit, latent indices to generate): every candidate of a filtered unit, else its missing finals."""


def find_progress(out: Path, rows: SetRows, owned: list[Unit], *, filtered: bool, overwrite: bool,
                  resolution: int, workers: int) -> Progress:
    """What of the units `owned` is done in `out` (nothing with `overwrite`)."""
    plan, progress = rows.plan, Progress()
    if plan.tar_units and not overwrite:
        # A shard is renamed into place whole: its images are done when it is there, ending as an archive ends.
        done_tars = {name for name in os.listdir(out) if SHARD_NAME.match(name) and complete_tar(out / name)}
        progress.valid = {i: True for u in owned if plan.tar_of(u) in done_tars for i in u.finals}
    elif not overwrite:
        # Which files exist and decode; a broken or foreign file is simply regenerated. Listing the folders
        # first keeps a fresh run from probing every planned name.
        present = set()
        for folder in {os.path.dirname(plan.relpath(u, u.finals[0])) for u in owned}:
            with os.scandir(out / folder) as entries:
                present.update(f"{folder}/{e.name}" if folder else e.name for e in entries)
        finals = [(i, rel) for u in owned for i in u.finals if (rel := plan.relpath(u, i)) in present]
        with cf.ThreadPoolExecutor(max_workers=max(workers, 2)) as checker:
            checks = checker.map(readable_image, [out / rel for _, rel in finals], [resolution] * len(finals))
            progress.valid = {i: ok for (i, _), ok in zip(finals, checks)}
    valid = progress.valid
    cache = load_rows(out, rows) if filtered and not overwrite else {}
    for unit in owned:
        if not filtered:
            missing = [i for i in unit.finals if not valid.get(i)]
            progress.rows += [rows.row(unit, latent=i, index=i) for i in unit.finals if valid.get(i)]
            progress.existing += len(unit.finals) - len(missing)
            if missing:
                progress.jobs.append((unit, missing))
            continue
        done = unit_rows(unit, cache, lambda f: valid.get(int(Path(f).stem), False))
        if done is None:
            progress.jobs.append((unit, list(unit.candidates)))
        else:
            progress.rows += done
            progress.existing += sum(r.kept for r in done)
    return progress


def _on_disk(out: Path, plan: Plan) -> Callable[[str], bool]:
    """Whether a final image (its `Plan.relpath`) is on disk: its file, or its tar shard."""
    if not plan.tar_units:
        return lambda f: (out / f).is_file()
    shards: dict[str, bool] = {}

    def present(f: str) -> bool:
        tar = f.split("/", 1)[0]
        if tar not in shards:
            shards[tar] = (out / tar).is_file()
        return shards[tar]

    return present


def try_merge(out: Path, rows: SetRows, filtered: bool) -> Path | None:
    """Write the merged manifest when every unit of the set (all shards) is done; else return None."""
    plan = rows.plan
    cache = load_rows(out, rows) if filtered else {}
    present = _on_disk(out, plan)
    merged: list[ManifestRow] = []
    for unit in plan.units:
        if filtered:
            done = unit_rows(unit, cache, present)
            if done is None:
                return None
            merged += done
        else:
            for index in unit.finals:
                if not present(plan.relpath(unit, index)):
                    return None
                merged.append(rows.row(unit, latent=index, index=index))
    write_manifest(out / MANIFEST, merged)
    return out / MANIFEST


def clean_stale_tmp(out: Path, plan: Plan, shard: tuple[int, int]) -> None:
    """Remove temporary files a killed run left behind, only where no other running shard can be writing."""
    for folder in [out, *(out / c for c in plan.classes if c is not None)]:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            match = IMAGE_TMP.match(p.name)
            tar = SHARD_TMP.match(p.name) if folder == out else None
            if match:
                unit = plan.unit_of_final(int(match.group(1)))
                if unit is None or plan.owner(unit, shard[1]) == shard[0]:
                    p.unlink(missing_ok=True)
            elif tar:
                if int(tar.group(1)) % shard[1] == shard[0]:  # tar shard t is written by process shard t % N
                    p.unlink(missing_ok=True)
            elif folder == out and ".tmp-" in p.name:
                own = p.name.startswith(shard_manifest_name(shard) + ".")
                if shard[1] == 1 or own:
                    p.unlink(missing_ok=True)
