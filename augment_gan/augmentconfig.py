"""The settings of an `augment` run: `AugmentConfig` (the options of one call), the augment.json that records
them in the output folder, which of them define the result (a folder is resumed only when they match), and
`check_inputs`, the checks of DATA, DIR and the pool that run before any work.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from augment_gan import __version__
from augment_gan.errors import UserError
from augment_gan.outputs import inside
from augment_gan.validation import check_types

if TYPE_CHECKING:
    from augment_gan.config import TrainConfig

SETTINGS = "augment.json"
NOT_IDENTITY = ("merge", "device", "threads", "overwrite", "progress")
"""AugmentConfig fields that do not change the result, so a rerun may change them (e.g. add `merge`)."""
AUGMENT_OWNS = ("minutes", "kimg", "resolution", "seed", "conditional")
"""TrainConfig fields that augment sets itself; `fit_options` may not."""


@dataclass(frozen=True)
class AugmentConfig:
    """Options of one `augment` call (`augment-gan augment`)."""

    minutes: float | None = 5.0
    """Wall-clock minutes of the fit in total (a resumed fit counts what it used before); ignored with `kimg`."""
    kimg: float | None = None
    """Fit budget in thousands of real images shown to D, instead of `minutes`."""
    val_fraction: float = 0.2
    """Share of each class held out for measuring, in (0, 0.5]."""
    seeds: int = 3
    """Paired seeds: seed s trains the real-only and every real+candidate classifier. One seed gives no
    standard error, so never a choice."""
    steps: int = 300
    """Optimizer steps of every classifier, the same for every arm: evaluate --downstream's default (300 × 64
    images; about 10 s per classifier on a 2-core CPU, so the default 3 seeds × 5-7 classifiers take 2-4 minutes)."""
    batch_size: int = 64
    """Batch size of the classifiers."""
    ratios: tuple[float, ...] = (0.25, 0.5)
    """Shares of synthetic images per classifier batch at which every set is measured (and the chosen one's
    becomes the recipe's synthetic_ratio). 25% and 50% gave the same few-shot gain within 0.3 pp
    (benchmarks/RESULTS.md), so the default measures both rather than guessing."""
    set_size: int = 2000
    """Fewest images in a balanced candidate set (`plan_sets`). A classifier draws ratio × batch × steps synthetic
    images; a set sized for one epoch of the training part (80 images for 80 training images at 50%) would show
    each image a hundred times and waste the generator's variety. On few-label digits, 10,000 images gained no
    more than 2,000 (benchmarks/RESULTS.md, bench_pool), so 2,000 is enough."""
    recipe: str = "standard"
    """Augmentation recipe of the classifiers (name or YAML path), and the base of DIR/recipe.yaml."""
    resolution: int = 32
    """Side length the GAN is trained at and the classifiers read every image at."""
    seed: int = 0
    """Seeds the split, the fit and the synthetic sets; the classifiers use seed, seed + 1, ..."""
    unlabeled: str | None = None
    """A folder of unlabeled images to fit on, with the training part as its labels (the unlabeled-pool fit)."""
    fit_options: dict[str, Any] | None = None
    """Other `TrainConfig` fields for the fit (network widths, batch size, ...): `fit --config`'s fields. The
    budget, resolution, seed and conditioning are augment's own."""
    merge: bool = False
    """Also write DIR/merged: DATA and the chosen set as one augmented ImageFolder (`merge`)."""
    device: str = "auto"
    """Device of the fit, the synthetic sets and the classifiers: auto, cpu, cuda, cuda:N or mps."""
    threads: int | None = None
    """torch threads while the classifiers train; None: 1 on the CPU (see `EvaluateConfig.threads`)."""
    overwrite: bool = False
    """Replace what an earlier augment wrote in DIR (with any settings) instead of resuming it."""
    progress: bool = True
    """Progress bars on stderr."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.minutes is None and self.kimg is None:
            raise UserError("set a fit budget: --minutes or --kimg")
        for name in ("minutes", "kimg"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name} must be positive, got {value:g}")
        if not 0 < self.val_fraction <= 0.5:
            raise UserError(f"--val-fraction must be in (0, 0.5], got {self.val_fraction:g}")
        if self.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {self.seeds}")
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 2:
            raise UserError(f"batch size must be at least 2, got {self.batch_size}")
        if self.set_size < 1:
            raise UserError(f"--set-size must be at least 1, got {self.set_size}")
        if not self.ratios:
            raise UserError("--ratios is empty; give at least one share of synthetic images, e.g. 0.25")
        if len(set(self.ratios)) < len(self.ratios):
            raise UserError(f"--ratios repeats a value: {', '.join(f'{r:g}' for r in self.ratios)}")
        for r in self.ratios:
            if not 0 < r < 1:
                raise UserError(f"--ratios must be shares in (0, 1), got {r:g}")
            if round(r * self.batch_size) < 1:
                raise UserError(f"ratio {r:g} of a batch of {self.batch_size} is no synthetic image; "
                                "raise the ratio or the batch size")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.fit_options is not None:
            if not isinstance(self.fit_options, dict):
                raise UserError(f"fit_options must be a mapping of TrainConfig fields, got {self.fit_options!r}")
            own = sorted(set(self.fit_options) & set(AUGMENT_OWNS))
            if own:
                raise UserError(f"the fit's {', '.join(own)} are set by augment itself (--minutes/--kimg, "
                                "--resolution, --seed; the fit is always conditional); remove them from the config")
        self.train_config()  # a bad fit option fails now, not after the split
        from augment_gan.recipes import check_recipe

        check_recipe(self.recipe)

    def train_config(self) -> TrainConfig:
        """The `TrainConfig` of the fit."""
        from augment_gan.config import TrainConfig

        return TrainConfig.from_dict({**(self.fit_options or {}), "resolution": self.resolution, "seed": self.seed,
                                      "minutes": None if self.kimg is not None else self.minutes,
                                      "kimg": self.kimg, "conditional": True})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_settings(data_root: Path, config: AugmentConfig) -> dict[str, Any]:
    """augment.json: the settings that define a result (JSON-normalised, so it compares with a read one)."""
    identity = {k: v for k, v in config.to_dict().items() if k not in NOT_IDENTITY}
    identity["unlabeled"] = str(Path(config.unlabeled).expanduser().resolve()) if config.unlabeled else None
    settings = {"package_version": __version__, "data": str(data_root), "config": identity,
                "fit_config": config.train_config().to_dict()}
    return json.loads(json.dumps(settings))


def settings_identity(settings: dict[str, Any]) -> dict[str, Any]:
    """What makes two augment.json the same result: DATA and every config field but `NOT_IDENTITY`."""
    return {"data": settings.get("data"), **(settings.get("config") or {})}


# ----------------------------------------------------------------------------------------------------
# Checks against the file system, before any work.

def check_inputs(data: str | os.PathLike[str], out: Path, config: AugmentConfig) -> Any:
    """Everything that can be checked without reading an image or writing a file; returns DATA's scan."""
    from augment_gan.data import scan_folder

    scan = scan_folder(data)  # a missing DATA, or a file, is a UserError here
    if scan.layout in ("flat", "mixed"):
        where = "no class subfolders" if scan.layout == "flat" else "images outside its class subfolders"
        raise UserError(f"{scan.root} has {where}, so no labels to measure a classifier with; for an "
                        f"unlabeled folder run `augment-gan fit {data} --out RUN` then `augment-gan synth RUN --n N "
                        "--out DIR`")
    if scan.layout == "empty":
        raise UserError(f"no images in {scan.root}")
    counts = np.bincount(np.asarray(scan.labels), minlength=len(scan.classes))
    if len(scan.classes) < 2:
        raise UserError(f"{scan.root} has one class ({scan.classes[0]}); augment compares classifiers, which "
                        "needs at least two class subfolders")
    if (counts >= 2).sum() < 2:
        raise UserError(f"{scan.root}: at least two classes need two or more images, one to train on and one to "
                        "hold out for measuring")
    out_abs = out.resolve()
    if inside(out_abs, scan.root) or inside(scan.root, out_abs):
        raise UserError(f"--out {out} and DATA {scan.root} must not contain each other")
    if config.unlabeled is not None:
        pool = Path(config.unlabeled).expanduser()
        if not pool.is_dir():
            raise UserError(f"--unlabeled folder not found: {config.unlabeled}")
        if not _fit_takes_labels():
            raise UserError("--unlabeled needs the unlabeled-pool fit (`fit POOL --labels DATA`), which this "
                            "version of augment-gan does not have; run augment without --unlabeled")
        if inside(out_abs, pool.resolve()) or inside(pool.resolve(), out_abs):
            raise UserError(f"--out {out} and --unlabeled {pool} must not contain each other")
    return scan


def _fit_takes_labels() -> bool:
    """Whether `fit` can train on an unlabeled pool with a labeled folder (`labels=`)."""
    import inspect

    from augment_gan.train import fit

    return "labels" in inspect.signature(fit).parameters
