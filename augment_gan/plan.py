"""The plan of a synthetic set: which latent indices become which files, and which shard owns them.

Pure functions of the options (no file I/O; only the shard may come from torchrun's environment): synth's
determinism, shards and resume follow from them.

Image i of a set is a pure function of (checkpoint, seed, options, i). Classes are assigned round-robin over
the selected classes (i % C), so class c holds the final indices c, c + C, c + 2C, ... and the default is
balanced. Latents come from `sample.latents(seed, [latent index])`.

Work is cut into *units*: one class, up to `GROUP_SIZE` (256) consecutive final images of it. A unit's
candidates are its own final indices (the "primaries") plus, with `--keep-top F`, extra latent indices from
beyond the class's end, so that a unit of k finals has ceil(k/F) candidates (per class: ceil(n_c/F)). Extras
of class c use the latent indices c + C·t for t = n_c, n_c + 1, ... in unit order. Shard K of N owns the
units at positions K, K+N, ...

With `--format tar` (`augment_gan.tarshards`) the units are also grouped into tar shards of `tar_units`
consecutive units: shard t holds units t·U .. t·U + U - 1, its images are named `shard-<t>.tar/<index>.png`,
and process shard K of N owns the tar shards K, K+N, ... (a tar is written by one process).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction

from augment_gan.errors import UserError
from augment_gan.imagefile import FORMATS
from augment_gan.outputs import check_class_name
from augment_gan.tarshards import TAR_FORMAT, TAR_IMAGE_FORMAT, shard_name

GROUP_SIZE = 256
"""Final images of one class per unit: the granularity of shards, resume and keep-top ranking."""
IMAGE_NAME = re.compile(rf"^(\d{{6,}})\.({'|'.join(FORMATS)})$")
"""The name of a final image (`Plan.relpath`): its index, at least 6 digits, and the format's extension."""
IMAGE_TMP = re.compile(rf"^(\d{{6,}})\.({'|'.join(FORMATS)})\.tmp-.+$")
"""A final image's temporary file while it is written (`augment_gan.atomic`)."""


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
    """Every unit of a set, with the class split; `relpath` names a final image's file."""

    n: int
    classes: tuple[str | None, ...]
    """Selected class names, (None,) for an unconditional checkpoint."""
    labels: tuple[int | None, ...]
    counts: tuple[int, ...]
    keep_top: float | None
    ext: str
    units: tuple[Unit, ...] = field(repr=False)
    tar_units: int | None = None
    """Units per tar shard (`--format tar`); None: one file per image, in class folders."""

    def relpath(self, unit: Unit, index: int) -> str:
        name = f"{index:06d}.{self.ext}"
        if self.tar_units:
            return f"{self.tar_of(unit)}/{name}"
        return name if unit.class_name is None else f"{unit.class_name}/{name}"

    def tar_of(self, unit: Unit) -> str:
        """The tar shard holding a unit's images (`--format tar`)."""
        assert self.tar_units
        return shard_name(unit.position // self.tar_units)

    def owner(self, unit: Unit, n: int) -> int:
        """Which of n process shards writes a unit: units go round-robin, or whole tar shards do."""
        return (unit.position // (self.tar_units or 1)) % n

    def label_of(self, index: int) -> int | None:
        """The label plan: final index i belongs to selected class i % C."""
        return self.labels[index % len(self.classes)]

    def owned(self, shard: tuple[int, int]) -> list[Unit]:
        k, n = shard
        return [u for u in self.units if self.owner(u, n) == k]

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


def balance_counts(class_counts: tuple[int, ...] | list[int], classes: list[str], selected: tuple[str, ...] | None,
                   balance_to: int | None) -> tuple[int, ...]:
    """`synth --balance`: images to write per selected class so that real + synthetic is balanced, max(0, N - n_c)
    with N = `balance_to` or the largest training class (over all classes, also when only some are selected).
    `class_counts` are the training folder's images per class, in `classes` order (from the checkpoint)."""
    if not classes:
        raise UserError("--balance needs a class-conditional run; this one is unconditional (use --n)")
    if len(class_counts) != len(classes):
        raise UserError("this checkpoint does not record how many training images each class had (it was trained "
                        "by an older augment-gan); give the counts with --per-class instead of --balance")
    target = max(class_counts) if balance_to is None else balance_to
    real = dict(zip(classes, class_counts))
    counts = tuple(max(0, target - real[c]) for c in (selected or classes))
    if not any(counts):
        raise UserError(f"nothing to write: every selected class already has >= {target} training images "
                        f"({', '.join(f'{c}: {real[c]}' for c in (selected or classes))}); raise --balance-to")
    return counts


def make_plan(checkpoint_classes: list[str], num_classes: int, *, n: int | None = None,
              per_class: int | None = None, counts: tuple[int, ...] | None = None,
              classes: tuple[str, ...] | None = None,
              keep_top: float | None = None, fmt: str = "png", images_per_tar: int | None = None) -> Plan:
    """The final indices, labels and candidates of a set (a pure function of its options). Give `n` (split
    evenly), `per_class`, or `counts` (one per selected class, e.g. from `balance_counts`; a class may get 0).
    `fmt` "tar" groups the units into tar shards of `images_per_tar` images (a multiple of `GROUP_SIZE`)."""
    if num_classes == 0:
        if per_class is not None or classes or counts is not None:
            raise UserError("--per-class, --classes and --balance need a class-conditional checkpoint; "
                            "this one is unconditional")
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
    if counts is not None:
        assert len(counts) == C and all(c >= 0 for c in counts), counts
        n = sum(counts)
    elif per_class is not None:
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
    tar_units = None
    if fmt == TAR_FORMAT:
        assert images_per_tar is not None and images_per_tar % GROUP_SIZE == 0, images_per_tar
        tar_units = images_per_tar // GROUP_SIZE
    return Plan(n=n, classes=names, labels=labels, counts=counts, keep_top=keep_top,
                ext=TAR_IMAGE_FORMAT if tar_units else fmt, units=tuple(units), tar_units=tar_units)


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
