"""Checkpoint metadata as a typed structure: what a run was trained on, with what, and how far it got.

It is stored as JSON in every checkpoint's safetensors header and beside it in `ckpt-<step>.json`;
`RunMeta.from_dict` reads both, including files written by earlier versions (fields they lack take
their defaults). No torch import here, so tools can read a run's metadata cheaply.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from augment_gan import __version__
from augment_gan.config import TrainConfig
from augment_gan.errors import UserError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class LabelsInfo:
    """`fit --labels`: the labeled folder and the pseudo-labels the run trained on (RUN/pseudo_labels.json has
    every label; `augment_gan.pseudolabel`)."""

    root: str = ""                       # absolute path of the labeled folder
    confidence: float = 0.0              # unlabeled images were kept at or above this softmax probability
    labeled_images: int = 0              # labeled images, trained on with their own labels
    pseudo_counts: tuple[int, ...] = ()  # unlabeled images kept per class, in the run's `classes` order
    classifier_accuracy: float | None = None  # the labelling classifier's accuracy on held-out labeled images

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "confidence": self.confidence, "labeled_images": self.labeled_images,
                "pseudo_counts": list(self.pseudo_counts), "classifier_accuracy": self.classifier_accuracy}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabelsInfo":
        accuracy = data.get("classifier_accuracy")
        return cls(root=str(data.get("root") or ""), confidence=float(data.get("confidence", 0.0)),
                   labeled_images=int(data.get("labeled_images", 0)),
                   pseudo_counts=tuple(int(c) for c in data.get("pseudo_counts", ())),
                   classifier_accuracy=None if accuracy is None else float(accuracy))


@dataclass(frozen=True)
class DataInfo:
    """The training folder as fit read it."""

    root: str = ""                 # absolute path of the folder
    images: int = 0                # images read (with --labels: the images trained on)
    channels: int = 0              # 1 (grayscale) or 3
    classes: tuple[str, ...] = ()  # its class subfolders (also when the run ignored them; --labels: the labeled ones)
    skipped: int = 0               # unreadable files skipped
    class_counts: tuple[int, ...] = ()  # images per class, in `classes` order (empty when unlabeled)
    labels: LabelsInfo | None = None    # `fit --labels`; None otherwise (and in checkpoints written before it)

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "images": self.images, "channels": self.channels,
                "classes": list(self.classes), "skipped": self.skipped, "class_counts": list(self.class_counts),
                **({"labels": self.labels.to_dict()} if self.labels is not None else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "DataInfo":
        data = data or {}
        labels = data.get("labels")
        return cls(root=str(data.get("root") or ""), images=int(data.get("images", 0)),
                   channels=int(data.get("channels", 0)), classes=tuple(data.get("classes", ())),
                   skipped=int(data.get("skipped", 0)), class_counts=tuple(data.get("class_counts", ())),
                   labels=LabelsInfo.from_dict(labels) if labels is not None else None)


@dataclass(frozen=True)
class RunMeta:
    """Metadata of one checkpoint. The networks are rebuilt from `config`, `channels` and `classes` alone."""

    config: TrainConfig
    conditional: bool              # G and D take class labels
    classes: tuple[str, ...]       # the classes G draws (empty when unconditional)
    channels: int                  # 1 or 3
    step: int = 0                  # optimizer steps taken
    nimg: int = 0                  # real images shown to D (global)
    elapsed_s: float = 0.0         # training budget used, in the config's clock
    ada: dict[str, float] = field(default_factory=dict)  # adaptive augmentation state: p, r_t, ...
    data: DataInfo = DataInfo()
    format_version: int = FORMAT_VERSION
    package_version: str = __version__

    @property
    def kimg(self) -> float:
        return self.nimg / 1000

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def num_classes(self) -> int:
        """Classes the networks were built for: 0 for an unconditional run."""
        return len(self.classes) if self.conditional else 0

    @property
    def ada_p(self) -> float:
        return float(self.ada.get("p", 0.0))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`kimg` and `resolution` are repeated for readers without this class)."""
        return {"format_version": self.format_version, "package_version": self.package_version,
                "step": self.step, "config": self.config.to_dict(), "conditional": self.conditional,
                "classes": list(self.classes), "channels": self.channels, "resolution": self.resolution,
                "nimg": self.nimg, "kimg": self.kimg, "elapsed_s": self.elapsed_s, "ada": dict(self.ada),
                "data": self.data.to_dict()}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path = "checkpoint") -> "RunMeta":
        """Read the JSON form; a newer format is an error, config fields this version lacks a warning."""
        try:
            version = int(data.get("format_version", 0))
            if version > FORMAT_VERSION:
                raise UserError(f"{source} was written by a newer checkpoint format ({version}); upgrade augment-gan")
            config = _config(dict(data["config"]))
            return cls(config=config, conditional=bool(data.get("conditional", False)),
                       classes=tuple(data.get("classes", ())), channels=int(data["channels"]),
                       step=int(data.get("step", 0)), nimg=int(data.get("nimg", 0)),
                       elapsed_s=float(data.get("elapsed_s", 0.0)), ada=dict(data.get("ada", {})),
                       data=DataInfo.from_dict(data.get("data")), format_version=version,
                       package_version=str(data.get("package_version", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{source}: checkpoint metadata is incomplete or malformed ({exc!r})") from None
        except UserError as exc:
            if str(source) in str(exc):
                raise
            raise UserError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, text: str, source: str | Path = "checkpoint") -> "RunMeta":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: checkpoint metadata is not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise UserError(f"{source}: checkpoint metadata is not a JSON object")
        return cls.from_dict(data, source)


BEFORE_FIELD = {"class_sampling": 1.0}
"""Config fields added later whose default differs from what earlier versions did: a checkpoint without the
field was trained (and resumes) the old way."""


def _config(data: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of a checkpoint; fields a newer version added are dropped with a warning."""
    known = {f.name for f in fields(TrainConfig)}
    extra = sorted(set(data) - known)
    if extra:
        warnings.warn(f"checkpoint config has fields this version does not know, ignored: {extra}", stacklevel=3)
    return TrainConfig.from_dict({**BEFORE_FIELD, **{k: v for k, v in data.items() if k in known}})


def latest_meta(run_dir: str | Path) -> RunMeta | None:
    """The metadata of a run's newest readable `ckpt-<step>.json` (plain JSON, no torch), or None."""
    folder = Path(run_dir) / "checkpoints"
    for path in sorted(folder.glob("ckpt-*.json"), reverse=True) if folder.is_dir() else []:
        try:
            return RunMeta.from_json(path.read_text(), path)
        except (OSError, UserError):
            continue
    return None
