"""Labels from a few labeled images: the classifier that `fit --labels` and `synth --label-with` share.

The small CNN of `augment_gan.classifier` is trained, seeded, on a labeled folder (ImageFolder layout) with an
augmentation recipe (`standard`), the way `evaluate --downstream` trains it. It then labels other images with
its most probable class and that class's softmax probability, the *confidence*; only images at or above
`LabelerConfig.confidence` get a label:
- `fit UNLABELED --labels LABELED` (pseudo-labelling, Lee 2013): the run trains class-conditionally on every
  labeled image with its own label plus the unlabeled images labeled confidently (`augment_gan.trainset`).
  The labels are written to RUN/pseudo_labels.json (`PseudoLabels`) before training; `--resume` reads them
  back and never labels again, so a resumed run trains on exactly the same labels.
- `synth RUN --label-with LABELED` (`augment_gan.labelwith`): the candidates of an unconditional run.

What a labeled folder must be (checked before any training, each a one-line `UserError`):
- a folder with at least two class subfolders (`data.scan_folder`'s "classes" layout);
- read like the run's images (same resolution, fit and background), so any size and aspect ratio is squared
  and resized like a training image; but an image whose short side is under 1/`MAX_UPSCALE` of the run's
  resolution (8 px for a 32 px run) does not fit: blown up more than 4×, it holds no detail at the scale the
  classifier is asked to label;
- of the run's channel count, decided by the pixels as for the training folder: labels learnt on colour
  images for a grayscale run (or on gray images for a colour one) would be applied to images unlike them.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from augment_gan.atomic import write_bytes_atomic
from augment_gan.data import FolderScan, ImageSet, ReadOptions, load_folder, scan_folder
from augment_gan.errors import UserError
from augment_gan.validation import check_types

_log = logging.getLogger(__name__)

PSEUDO_LABELS = "pseudo_labels.json"
"""The file in a `fit --labels` run folder holding every pseudo-label the run trains on."""
FORMAT = 1
CONFIDENCE = 0.9
"""Default threshold on the classifier's softmax probability. Measured on MNIST (2026-11-30, CPU): the default
classifier trained on 10 labeled digits per class labelled 2,000 others (files 100-299 of each class) 87.7-88.8%
right (seeds 0-2); keeping those at >= 0.8 kept 81-82% at 96.3-96.6% accuracy, >= 0.9 kept 72-74% at 98.1-98.4%,
>= 0.95 kept 64-67% at 98.9-99.5%. 0.9 cuts wrong labels from about 1 in 8 to 1 in 60 and keeps three quarters
of the images; FixMatch (Sohn et al. 2020) uses 0.95, which here costs another tenth of them."""
MAX_UPSCALE = 4
"""A labeled image fits when its short side is at least resolution / MAX_UPSCALE pixels."""
_CHUNK = 4096  # images read from a memory map and labelled at once


# ----------------------------------------------------------------------------------------------------
# The labeled folder.

def check_labeled_folder(folder: str | Path, what: str = "--labels") -> FolderScan:
    """The cheap checks, before anything is decoded: `folder` exists and has two or more class subfolders."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"{what} folder not found: {folder}")
    scan = scan_folder(path)
    if scan.layout == "empty":
        raise UserError(f"{what} {folder} holds no image files")
    if scan.layout != "classes":
        raise UserError(f"{what} {folder} has no class subfolders: put the images of each class in {folder}/<class>/")
    if len(scan.classes) < 2:
        raise UserError(f"{what} {folder} has one class ({scan.classes[0]}); labelling needs at least two")
    return scan


def read_labeled(folder: str | Path, options: ReadOptions, *, what: str = "--labels", cache_dir=None,
                 use_cache: bool = True, progress: bool = False) -> ImageSet:
    """The labeled folder decoded with the run's `options` (channels decided by its pixels; `check_channels`
    compares them with the run's), after the checks of the module docstring."""
    check_labeled_folder(folder, what)
    labeled = load_folder(folder, replace(options, channels="auto"), cache_dir=cache_dir, use_cache=use_cache,
                          progress=progress)
    counts = np.bincount(np.asarray(labeled.labels), minlength=len(labeled.classes))
    empty = [c for c, n in zip(labeled.classes, counts) if n == 0]
    if empty:
        raise UserError(f"{what} {folder}: class {empty[0]} has no readable image")
    least = options.resolution / MAX_UPSCALE
    small = [(f, w, h) for f, (w, h, _, _) in zip(labeled.files, labeled.sources) if min(w, h) < least]
    if small:
        f, w, h = small[0]
        raise UserError(f"{what} {folder}: {f} is {w}×{h} px ({len(small)} image(s) this small), too small for a "
                        f"{options.resolution} px run: the short side must be at least {least:g} px (upscaled at "
                        f"most {MAX_UPSCALE}×)")
    return labeled


def check_channels(labeled: ImageSet, channels: int, *, what: str = "--labels", against: str = "the run") -> None:
    """The labeled images have the run's channel count (1 or 3), as decided by their pixels."""
    if labeled.channels == channels:
        return
    if labeled.channels == 3:
        raise UserError(f"{what} {labeled.root} has colour images but {against} is grayscale: the classifier "
                        "would learn from colours the run's images lack")
    raise UserError(f"{what} {labeled.root} is grayscale but {against} has colour images: the classifier would "
                    "label colour images unlike any it learnt from")


# ----------------------------------------------------------------------------------------------------
# The classifier.

@dataclass(frozen=True)
class LabelerConfig:
    """How the labelling classifier is trained and when its label counts."""

    confidence: float = CONFIDENCE
    """An image gets the predicted label when its softmax probability is at least this, in (0, 1] (the default's
    measurement: `CONFIDENCE`)."""
    steps: int = 300
    """Optimizer steps of the classifier: `evaluate --downstream`'s (95.3% on the bundled digits' 350 images)."""
    batch_size: int = 64
    recipe: str = "standard"
    """Augmentation recipe of its training images (`none` for none)."""
    held_out: float = 0.2
    """Share of each class held out to measure the classifier's accuracy first (a second, equal training on the
    rest; the labels come from a classifier trained on every labeled image); 0 skips the measurement."""

    def __post_init__(self) -> None:
        check_types(self)
        if not 0.0 < self.confidence <= 1.0:
            raise UserError(f"--label-confidence must be in (0, 1], got {self.confidence}")
        if self.steps < 1:
            raise UserError(f"labelling classifier steps must be at least 1, got {self.steps}")
        if self.batch_size < 2:
            raise UserError(f"labelling classifier batch size must be at least 2, got {self.batch_size}")
        if not 0.0 <= self.held_out < 1.0:
            raise UserError(f"held-out share must be in [0, 1), got {self.held_out}")
        if self.recipe != "none":
            from augment_gan.recipes import check_recipe

            check_recipe(self.recipe)


@dataclass
class Labeler:
    """A trained labelling classifier: `label(images)` -> (class indices, confidence)."""

    model: Any                         # augment_gan.classifier.SmallCNN, in eval mode
    classes: list[str]
    config: LabelerConfig
    seed: int
    trained_on: int                    # labeled images
    held_out_accuracy: float | None    # None when not measured
    held_out_images: int

    def label(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 N×H×W×C -> (class indices int64 N, confidence float64 N rounded to 6 decimals: the value
        recorded and compared with the threshold, so a record read back decides exactly as it was written)."""
        from augment_gan.classifier import predict_confidence

        labels, confidence = predict_confidence(self.model, images)
        return labels, np.round(confidence.astype(np.float64), 6)

    def describe(self) -> dict[str, Any]:
        """The feature space the labels come from, for synth.json and pseudo_labels.json."""
        return {"features": "classifier", "network": "SmallCNN (augment_gan.classifier), softmax",
                "recipe": self.config.recipe, "steps": self.config.steps, "batch_size": self.config.batch_size,
                "seed": self.seed, "trained_on": self.trained_on,
                "held_out": {"share": self.config.held_out, "images": self.held_out_images,
                             "accuracy": self.held_out_accuracy}}


def train_labeler(labeled: ImageSet, config: LabelerConfig, *, seed: int, device: str = "cpu",
                  progress: bool = False, log: Callable[[str], None] = _log.info) -> Labeler:
    """Train the classifier on the labeled images (deterministic for a seed on the CPU: one torch thread, so the
    machine's core count cannot change a sum), measuring it first on a held-out share when every class has
    two images or more."""
    from augment_gan.classifier import accuracy, stratified_split, train_classifier
    from augment_gan.downstream import downstream_recipes, step_bar
    from augment_gan.evaluate import torch_threads

    images, labels = np.asarray(labeled.images), np.asarray(labeled.labels)
    recipe = downstream_recipes(config.recipe, seed)[0]
    measure = config.held_out > 0 and int(np.bincount(labels).min()) >= 2
    bar = step_bar(config.steps * (2 if measure else 1), "labelling classifier", progress)
    common = dict(steps=config.steps, batch_size=config.batch_size, seed=seed, recipe=recipe,
                  num_classes=len(labeled.classes), device=device, progress=lambda step, loss: bar.update())
    held_accuracy, held = None, 0
    with torch_threads(None, str(device)), bar:
        if measure:
            tr, te = stratified_split(labels, config.held_out, seed)
            held_accuracy = accuracy(train_classifier(images[tr], labels[tr], **common), images[te], labels[te])
            held = len(te)
            log(f"labelling classifier: {held_accuracy:.1%} on {held} held-out labeled images")
        model = train_classifier(images, labels, **common).to(device)
    return Labeler(model, list(labeled.classes), config, seed, len(images), held_accuracy, held)


# ----------------------------------------------------------------------------------------------------
# Pseudo-labels of an unlabeled folder (fit --labels).

def pixel_digest(image: np.ndarray) -> bytes:
    """A digest of decoded pixels: equal for the same image read the same way."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


def duplicates(unlabeled: ImageSet, labeled: ImageSet) -> dict[str, str]:
    """Unlabeled file -> the labeled file with the same decoded pixels (both read with the same options)."""
    index: dict[bytes, str] = {}
    for file, image in zip(labeled.files, np.asarray(labeled.images)):
        index.setdefault(pixel_digest(image), file)
    same = {}
    for start in range(0, len(unlabeled), _CHUNK):
        for k, image in enumerate(np.asarray(unlabeled.images[start:start + _CHUNK])):
            match = index.get(pixel_digest(image))
            if match is not None:
                same[unlabeled.files[start + k]] = match
    return same


@dataclass(frozen=True)
class PseudoLabels:
    """What a `fit --labels` run trains on, as RUN/pseudo_labels.json records it."""

    unlabeled: str                     # absolute path of the unlabeled folder
    labeled: str                       # absolute path of the labeled folder
    classes: tuple[str, ...]
    confidence: float                  # the threshold
    classifier: dict[str, Any]         # `Labeler.describe()`
    predicted: dict[str, tuple[str, float]]
    """Unlabeled file -> (predicted class, confidence); kept when the confidence is at least the threshold."""
    duplicates: dict[str, str]
    """Unlabeled file -> the labeled file with the same pixels: trained on once, with its true label."""

    def kept(self) -> dict[str, str]:
        """Unlabeled file -> class, for the images the run trains on with a pseudo-label."""
        return {f: c for f, (c, p) in self.predicted.items() if p >= self.confidence}

    def kept_counts(self) -> tuple[int, ...]:
        kept = list(self.kept().values())
        return tuple(kept.count(c) for c in self.classes)

    def to_dict(self) -> dict[str, Any]:
        kept = self.kept()
        return {"format": FORMAT, "unlabeled": self.unlabeled, "labeled": self.labeled, "classes": list(self.classes),
                "confidence": self.confidence, "classifier": self.classifier,
                "kept_per_class": dict(zip(self.classes, self.kept_counts())),
                "below_confidence": len(self.predicted) - len(kept), "duplicates": self.duplicates,
                "labels": {f: {"class": c, "confidence": p, "kept": f in kept} for f, (c, p) in self.predicted.items()}}

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = PSEUDO_LABELS) -> "PseudoLabels":
        try:
            if int(data.get("format", 0)) > FORMAT:
                raise UserError(f"{source} was written by a newer augment-gan; upgrade it")
            classes = tuple(str(c) for c in data["classes"])
            predicted = {str(f): (str(v["class"]), float(v["confidence"])) for f, v in data["labels"].items()}
            if any(c not in classes for c, _ in predicted.values()):
                raise ValueError("a label names no class of the file")
            return cls(unlabeled=str(data["unlabeled"]), labeled=str(data["labeled"]), classes=classes,
                       confidence=float(data["confidence"]), classifier=dict(data.get("classifier") or {}),
                       predicted=predicted, duplicates={str(f): str(g) for f, g in data["duplicates"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{source}: not a readable pseudo-label file ({exc!r})") from None

    def write(self, path: Path) -> None:
        """Indented JSON with one line per image (a folder may hold many), written atomically."""
        data = self.to_dict()
        labels = data.pop("labels")
        rows = ",\n".join(f"  {json.dumps(f)}: {json.dumps(v)}" for f, v in labels.items())
        text = json.dumps(data, indent=1)[:-2] + ',\n "labels": {\n' + rows + "\n }\n}\n"
        write_bytes_atomic(path, text.encode())

    @classmethod
    def read(cls, path: Path) -> "PseudoLabels":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"{path} is missing, so the labels this run trained on cannot be read back; "
                            "start a new run") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable pseudo-label file ({exc})") from None
        return cls.from_dict(data, path)

    def check_same(self, unlabeled: ImageSet, labeled: ImageSet, confidence: float, source: Path) -> None:
        """A resumed run gives the folders and threshold its labels were made with."""
        diffs = [f"{name} {now} (the run's: {then})" for name, now, then in (
            ("folder", str(unlabeled.root), self.unlabeled), ("--labels", str(labeled.root), self.labeled),
            ("--label-confidence", confidence, self.confidence), ("classes", list(labeled.classes), list(self.classes)))
            if now != then]
        if diffs:
            raise UserError(f"--resume: {'; '.join(diffs)} differ from {source}; resume with the run's own")


def pseudo_label(unlabeled: ImageSet, labeled: ImageSet, config: LabelerConfig, *, seed: int, device: str = "cpu",
                 progress: bool = False, log: Callable[[str], None] = _log.info) -> PseudoLabels:
    """Label every image of `unlabeled` that is not one of `labeled` (same pixels) with the classifier trained on
    `labeled`. Both sets are read with the same options and channels."""
    labeler = train_labeler(labeled, config, seed=seed, device=device, progress=progress, log=log)
    same = duplicates(unlabeled, labeled)
    todo = np.array([i for i, f in enumerate(unlabeled.files) if f not in same], dtype=np.int64)
    predicted: dict[str, tuple[str, float]] = {}
    for start in range(0, len(todo), _CHUNK):
        idx = todo[start:start + _CHUNK]
        labels, confidence = labeler.label(np.asarray(unlabeled.images[idx]))
        for i, c, p in zip(idx.tolist(), labels.tolist(), confidence.tolist()):
            predicted[unlabeled.files[i]] = (labeled.classes[c], p)
    result = PseudoLabels(str(unlabeled.root), str(labeled.root), tuple(labeled.classes), config.confidence,
                          labeler.describe(), predicted, same)
    counts = ", ".join(f"{c}: {n}" for c, n in zip(result.classes, result.kept_counts()))
    log(f"pseudo-labels: {len(result.kept())} of {len(predicted)} unlabeled images at confidence >= "
        f"{config.confidence:g} ({counts})" + (f"; {len(same)} more are labeled images, counted once" if same else ""))
    return result
