"""The settings of a synthetic set: `SynthConfig` (the options of one `synth` call), the synth.json that records
them in the output folder, and which of its fields define the set (a folder is resumed only when they match).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from augment_gan import __version__
from augment_gan.dedup import DEDUP_FEATURE, DEDUP_PERCENTILE
from augment_gan.errors import UserError
from augment_gan.imagefile import DEFAULT_QUALITY, PNG_COMPRESSOR, SYNTH_FORMATS
from augment_gan.plan import GROUP_SIZE, Plan
from augment_gan.pseudolabel import CONFIDENCE
from augment_gan.tarshards import DEFAULT_IMAGES_PER_TAR, TAR_FORMAT
from augment_gan.validation import check_types

SETTINGS = "synth.json"
LAYOUT_VERSION = 1


# ----------------------------------------------------------------------------------------------------
# Configuration.

@dataclass(frozen=True)
class SynthConfig:
    """Options of one `synth` call. The first group defines the set (recorded in synth.json); the second
    only changes how it is computed, never its bytes."""

    n: int | None = None
    """Number of images (split over the selected classes round-robin). Give `n` or `per_class`."""
    per_class: int | None = None
    """Images per selected class (conditional checkpoints)."""
    balance: bool = False
    """Write, per class c, max(0, N - n_c) images so that the training folder + this set is balanced; n_c are the
    training folder's counts recorded in the checkpoint (conditional runs). Instead of `n` / `per_class`."""
    balance_to: int | None = None
    """N of `balance` (default: the largest training class's count)."""
    classes: tuple[str, ...] | None = None
    """Subset of the checkpoint's classes to generate (default: all)."""
    seed: int = 0
    truncation: float = 1.0
    """ψ: latents are scaled by ψ toward the prior's mean 0 (see `augment_gan.sample`)."""
    format: str = "png"
    """An image format (one file per image), or "tar": PNGs in webdataset-style tar shards (`augment_gan.tarshards`)."""
    quality: int | None = None
    """JPEG/WebP quality 1-100 (default 95 / 90); PNG is lossless and takes none."""
    keep_top: float | None = None
    """Keep this fraction of candidates by discriminator score, per class (None: no rejection)."""
    dedup: bool = False
    """Drop near-copies of training images."""
    dedup_real: str | None = None
    """Training images for `dedup` (default: the folder recorded in the checkpoint)."""
    images_per_tar: int | None = None
    """`format="tar"`: images per tar shard, a multiple of 256 (default `tarshards.DEFAULT_IMAGES_PER_TAR`)."""
    label_with: str | None = None
    """A labeled folder (class subfolders) for an unconditional run: a classifier trained on it labels the
    candidates and the first `n` with confidence >= `label_confidence` are kept, as OUT/<class>/<index>
    (`augment_gan.labelwith`)."""
    label_confidence: float = CONFIDENCE
    """`label_with`: the least softmax probability of a kept candidate's class."""

    batch_size: int | None = None
    """Generator batch (default 256 up to 64px, fewer above; never changes the images)."""
    shard: tuple[int, int] | None = None
    """(K, N): write only shard K of N; None = from RANK/WORLD_SIZE, else the whole set."""
    overwrite: bool = False
    device: str = "auto"
    workers: int | None = None
    """Encoder threads (default: 1 per 8 cores on a CPU device, all cores but one with a GPU)."""
    threads: int | None = None
    """torch intra-op threads of each generator lane (default: see `sample.default_lanes`)."""
    lanes: int | None = None
    """Generator forwards running at once, each on its own thread and batch (default: see `sample.default_lanes`)."""
    pool: str = "thread"
    """Encoder pool: "thread" or "process" (threads measured faster; see benchmarks/bench_synth.py)."""
    progress: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.balance:
            if self.n is not None or self.per_class is not None:
                raise UserError("--balance sets how many images each class gets; give it without --n and --per-class")
            if self.balance_to is not None and (isinstance(self.balance_to, bool) or self.balance_to < 1):
                raise UserError(f"--balance-to must be a positive integer, got {self.balance_to!r}")
        elif self.balance_to is not None:
            raise UserError("--balance-to needs --balance")
        elif (self.n is None) == (self.per_class is None):
            raise UserError("give the number of images: --n N, --per-class N or --balance (one of them)")
        for name in ("n", "per_class"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
            if not self.classes:
                raise UserError("--classes is empty")
        if self.format not in SYNTH_FORMATS:
            raise UserError(f"unknown format {self.format!r}; choose one of {', '.join(SYNTH_FORMATS)}")
        if self.format == TAR_FORMAT:
            if self.images_per_tar is None:
                object.__setattr__(self, "images_per_tar", DEFAULT_IMAGES_PER_TAR)
            if self.images_per_tar < GROUP_SIZE or self.images_per_tar % GROUP_SIZE:
                raise UserError(f"--images-per-tar must be a positive multiple of {GROUP_SIZE} (the unit of shards "
                                f"and resume), got {self.images_per_tar}")
            if self.pool != "thread":
                raise UserError("--format tar encodes in threads (pool 'thread'); the process pool writes files")
        elif self.images_per_tar is not None:
            raise UserError("--images-per-tar applies to --format tar")
        if self.quality is not None:
            if self.format in ("png", TAR_FORMAT):
                raise UserError("--quality applies to jpg and webp; png is lossless (and --format tar holds PNGs)")
            if not 1 <= self.quality <= 100:
                raise UserError(f"--quality must be in 1..100, got {self.quality}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
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
        if self.label_with is not None:
            others = [name for name, given in (
                ("--per-class", self.per_class is not None), ("--balance", self.balance),
                ("--classes", self.classes is not None), ("--keep-top", self.keep_top is not None),
                ("--dedup", self.dedup), ("--format tar", self.format == TAR_FORMAT),
                ("--shard", self.shard is not None)) if given]
            if others:
                raise UserError(f"--label-with writes --n images in one process; it does not take {', '.join(others)}")
            if not 0.0 < self.label_confidence <= 1.0:
                raise UserError(f"--label-confidence must be in (0, 1], got {self.label_confidence}")
        elif self.label_confidence != CONFIDENCE:
            raise UserError("--label-confidence needs --label-with")


# ----------------------------------------------------------------------------------------------------
# Settings (synth.json).

def settings_head(ckpt: Any) -> dict[str, Any]:
    """The first fields of every synth.json (`make_settings`, and `synth --label-with`'s): layout and checkpoint."""
    return {"layout_version": LAYOUT_VERSION, "package_version": __version__,
            "checkpoint": {"path": str(Path(ckpt.path).resolve()), "digest": ckpt.digest}}


def sampling_settings(config: SynthConfig, ext: str) -> dict[str, Any]:
    """How every synth.json's images are drawn and encoded: seed, truncation, latent scheme, format."""
    from augment_gan.sample import LATENT_SCHEME

    return {"seed": config.seed, "truncation": config.truncation,
            "truncation_method": "psi: z * psi (the prior's mean is 0)", "latent_scheme": LATENT_SCHEME,
            "format": config.format, "quality": config.quality or DEFAULT_QUALITY[ext],
            "png_compressor": PNG_COMPRESSOR if ext == "png" else None}


def make_settings(ckpt: Any, plan: Plan, config: SynthConfig, dedup_real: Path | None) -> dict[str, Any]:
    """The synth.json of a set (its `dedup_threshold` is filled in once the dedup index is built)."""
    return {
        **settings_head(ckpt),
        "classes": list(ckpt.classes) if ckpt.num_classes else [],
        "conditional": bool(ckpt.num_classes),
        "selected_classes": [c for c in plan.classes if c is not None],
        "counts": list(plan.counts),
        "n": plan.n,
        "balance": {"to": config.balance_to, "training_counts": list(ckpt.meta.data.class_counts)}
                   if config.balance else None,
        **sampling_settings(config, plan.ext),
        "images_per_tar": config.images_per_tar,
        "resolution": ckpt.resolution,
        "channels": ckpt.channels,
        "group_size": GROUP_SIZE,
        "filters": {
            "keep_top": config.keep_top,
            "dedup": config.dedup,
            "dedup_real": str(dedup_real) if dedup_real else None,
            "dedup_feature": DEDUP_FEATURE if config.dedup else None,
            "dedup_percentile": DEDUP_PERCENTILE if config.dedup else None,
            "dedup_threshold": None,
        },
    }


_IDENTITY = ("layout_version", "classes", "conditional", "selected_classes", "counts", "n", "seed",
             "truncation", "latent_scheme", "format", "quality", "group_size", "images_per_tar")


def settings_identity(settings: dict[str, Any]) -> dict[str, Any]:
    """The fields of a synth.json that define the set: two folders with the same identity hold the same images."""
    filters = settings.get("filters") or {}
    return {**{k: settings.get(k) for k in _IDENTITY},
            "checkpoint": (settings.get("checkpoint") or {}).get("digest"),
            "keep_top": filters.get("keep_top"), "dedup": filters.get("dedup"),
            "dedup_real": filters.get("dedup_real")}
