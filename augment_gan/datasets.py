"""Torchvision-facing datasets of synthetic images, from disk or from a generator.

Every dataset here returns `(PIL image, int label)` like `torchvision.datasets.ImageFolder`, so the
user's `transform=` (a torchvision transform or an augment-gan `Recipe`) works unchanged. None of them
augments anything itself. Mixing them with real data (`MixedDataset`, `MixedSampler`,
`DistributedMixedSampler`) lives in `augment_gan.mixing`; those names import from here too. A set written
with `synth --format tar` is read with `SyntheticTarDataset` (`augment_gan.tardataset`, also importable from
here), any other with `SyntheticImageFolder`.

Sizes. A synthetic image has the generator's resolution (32 px and up), which need not be the real
images' (28 px MNIST). `size=` resizes every image before `transform`; `MixedDataset` sets it to the
real images' size by itself when the two differ, so one batch holds one size.

Labels. A synthetic set is aligned to a real `ImageFolder` by class *name*: pass
`class_to_idx=real.class_to_idx`. A synthetic class the real set lacks is an error (its label would be
meaningless); a real class with no synthetic images is only a warning, because generating some classes
on purpose (the rare ones) is a normal use. Unconditional (unlabeled) synthetic images have label -1 and
cannot be aligned to classes.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import VisionDataset
from torchvision.datasets.vision import StandardTransform

from augment_gan.errors import UserError
from augment_gan.manifest import MANIFEST, read_manifest
from augment_gan.synthconfig import SETTINGS
from augment_gan.tarshards import TAR_FORMAT

if TYPE_CHECKING:
    from augment_gan.tardataset import SyntheticTarDataset as SyntheticTarDataset

UNLABELED = -1
"""Label of images from an unconditional generator."""

_ELSEWHERE = {
    "MixedDataset": "augment_gan.mixing",
    "MixedSampler": "augment_gan.mixing",
    "DistributedMixedSampler": "augment_gan.mixing",
    "SyntheticTarDataset": "augment_gan.tardataset",
}


def __getattr__(name: str) -> Any:
    # `from augment_gan.datasets import MixedDataset` (or SyntheticTarDataset) keeps working; imported
    # lazily because those modules themselves import this one.
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_loader(path: str | Path) -> Image.Image:
    """Open an image the way torchvision's `ImageFolder` does by default: decoded and converted to RGB.

    Matching ImageFolder matters more than keeping grayscale: real and synthetic samples end up in the
    same batch, so they must have the same number of channels. Pass `loader=` (the same one you give
    ImageFolder) to read grayscale instead, e.g. `lambda p: Image.open(p).convert("L")`.
    """
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")


def align_classes(own: list[str], class_to_idx: dict[str, int] | None, present: set[str], what: str
                  ) -> tuple[dict[str, int], list[str]]:
    """Map a synthetic set's class names onto a real set's `class_to_idx`.

    Returns (mapping used for labels, classes list indexed by label). `own` are the classes the generator
    knows; `present` those that actually have samples.
    """
    if class_to_idx is None:
        return {name: i for i, name in enumerate(own)}, list(own)
    if not isinstance(class_to_idx, dict):
        raise UserError(f"class_to_idx must be a dict of class name -> index, got {type(class_to_idx).__name__}")
    if not own:
        if class_to_idx:
            raise UserError(f"{what} is unconditional (no classes, label -1); it cannot be aligned to "
                            f"{len(class_to_idx)} real classes")
        return {}, []
    extra = sorted(set(own) - set(class_to_idx))
    if extra:
        missing = sorted(set(class_to_idx) - set(own))
        raise UserError(f"{what} has class(es) the real set lacks: {', '.join(extra)}"
                        + (f" (real classes it lacks: {', '.join(missing)})" if missing else ""))
    absent = sorted(set(class_to_idx) - present)
    if absent:
        warnings.warn(f"{what} has no images of class(es) {', '.join(absent)}; those classes get real images only",
                      stacklevel=3)
    classes = [name for name, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]
    return dict(class_to_idx), classes


# ----------------------------------------------------------------------------------------------------------
# Synthetic images on disk.

def synth_settings(root: Path) -> dict[str, Any]:
    """The synth.json of a synthetic folder."""
    path = root / SETTINGS
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{root} has no synth.json, so it was not written by `augment-gan synth`") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: not a JSON object")
    return info


def as_size(size: Any) -> tuple[int, int] | None:
    """A `size=` argument as (height, width): an int is a square side, as in torchvision's `Resize`."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, (int, np.integer)) else size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in pair):
        raise UserError(f"size must be a positive integer or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def resize_to(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """Resize to (height, width), with the Lanczos filter the folder reader (augment_gan.data) uses."""
    if size is None or image.size == (size[1], size[0]):
        return image
    return image.resize((size[1], size[0]), Image.Resampling.LANCZOS)


def apply_transforms(image, target, transform, target_transform):
    """(transform(image), target_transform(target)), each only when given: torchvision's convention."""
    if transform is not None:
        image = transform(image)
    if target_transform is not None:
        target = target_transform(target)
    return image, target


def planned_empty(info: dict[str, Any]) -> set[str]:
    """Classes that a synth folder's plan (its synth.json, `info`) gives no images (`synth --balance` skips the
    classes that need none): their absence is by design, not worth a warning."""
    return {c for c, n in zip(info.get("selected_classes") or [], info.get("counts") or []) if n == 0}


def _synthetic_records(root: Path) -> tuple[list[dict[str, Any]], list[str], bool, dict[str, Any]]:
    """(manifest records, the generator's classes, conditional?, synth.json or {}) of a synth/vary folder,
    checked."""
    if not root.is_dir():
        raise UserError(f"synthetic folder not found: {root}")
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise UserError(f"{root} has no {MANIFEST}, so it was not written by `augment-gan synth` "
                        "(for a plain folder of images use torchvision's ImageFolder)")
    info = synth_settings(root) if (root / SETTINGS).is_file() else {}
    if info.get("format") == TAR_FORMAT:
        raise UserError(f"{root} holds tar shards (`synth --format tar`); read it with SyntheticTarDataset")
    records = [{**row.to_dict(), "_line": row.line} for row in read_manifest(manifest)]

    labeled = {r["class"] is not None for r in records}
    if len(labeled) > 1:
        raise UserError(f"{manifest}: some entries have a class and some do not")
    conditional = labeled == {True}
    own = list(info.get("classes") or []) if conditional else []
    if conditional and own:
        # `label` indexes the checkpoint's classes (synth.json); a disagreement means a mixed-up folder.
        for r in records:
            label = r["label"]
            if r["class"] not in own or not isinstance(label, int) or not 0 <= label < len(own) \
                    or own[label] != r["class"]:
                raise UserError(f"{manifest}:{r['_line']}: class {r['class']!r} and label {label!r} do not "
                                f"match the classes in synth.json {own}")
    elif conditional:  # no synth.json: the classes named in the manifest, in ImageFolder's order
        own = sorted({r["class"] for r in records})
    return records, own, conditional, info


class SyntheticImageFolder(VisionDataset):
    """Images written by `augment-gan synth` (or `vary`), read through its manifest (`augment_gan.manifest`).

    Only images marked `kept: true` that exist on disk are used (filtered and deleted files are skipped,
    with a warning for the deleted ones). Labels follow `class_to_idx` (normally the real
    `ImageFolder`'s), matched by class name; without it they follow the checkpoint's class order, which
    for a generator trained on that folder is the same as ImageFolder's. Unconditional sets have label -1.
    `size` (an int or (height, width)) resizes every image before `transform`; None keeps the files' size.

    A torchvision `VisionDataset` with ImageFolder's interface, so code written for ImageFolder takes it
    unchanged: `transform`, `target_transform` (read at every access, so they can be replaced later) or a
    joint `transforms(image, target)`, `loader`, `find_classes`, and the attributes `root`, `classes`,
    `class_to_idx`, `samples` (list of (path, label)), `targets`, `imgs`; plus `records`, the manifest entry
    of each sample.
    """

    def __init__(self, path: str | os.PathLike, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None, *, target_transform: Callable | None = None,
                 transforms: Callable | None = None, loader: Callable[[str], Any] = default_loader,
                 size: int | tuple[int, int] | None = None):
        if transforms is not None and (transform is not None or target_transform is not None):
            raise UserError("pass either transforms or transform/target_transform, not both (as for VisionDataset)")
        root = Path(path)
        manifest = root / MANIFEST
        records, own, conditional, info = _synthetic_records(root)
        super().__init__(root, transforms=transforms, transform=transform, target_transform=target_transform)

        kept = [r for r in records if r["kept"] is True]
        usable = [r for r in kept if (root / r["file"]).is_file()]
        if len(usable) < len(kept):
            warnings.warn(f"{len(kept) - len(usable)} image(s) marked kept in {manifest} are missing on disk; "
                          "skipping them", stacklevel=2)
        self.class_to_idx, self.classes = align_classes(
            own, class_to_idx, {r["class"] for r in usable} | planned_empty(info), f"synthetic set {root}")

        self.root = root
        self.loader = loader
        self.size = as_size(size)
        self.records = usable
        self.samples = [(str(root / r["file"]), self.class_to_idx[r["class"]] if conditional else UNLABELED)
                        for r in usable]
        self.targets = [label for _, label in self.samples]
        self.imgs = self.samples

    def __len__(self) -> int:
        return len(self.samples)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """The classes of the synthetic set in `directory`, as `ImageFolder.find_classes` returns them: the
        generator's class names in its order (synth.json), else those the manifest names, sorted; ([], {})
        for an unconditional set."""
        _, own, _, _ = _synthetic_records(Path(directory))
        return list(own), {name: i for i, name in enumerate(own)}

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        image = resize_to(self.loader(path), self.size)
        if self.transforms is not None and not isinstance(self.transforms, StandardTransform):
            return self.transforms(image, target)  # a joint transform, given as `transforms=`
        # ImageFolder reads these two at every access, so code that swaps `dataset.transform` works here too.
        return apply_transforms(image, target, self.transform, self.target_transform)

    def __repr__(self) -> str:
        return f"SyntheticImageFolder({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


# ----------------------------------------------------------------------------------------------------------
# Synthetic images generated on the fly.

class GeneratorDataset(Dataset):
    """`n` synthetic images generated on demand by a checkpoint's generator, never written to disk.

    Item i is a pure function of (checkpoint, seed, i): the same index gives the same image in any
    order, in any DataLoader worker. Images are generated `batch_size` at a time and the last batch is
    cached, so a sequential or batched read costs one generator call per batch (random access costs one
    per item, still correct). The checkpoint is loaded lazily in each worker, never pickled.

    `labels`: None or "balanced" (class i % num_classes, the default for conditional generators), or a
    list of n class names / checkpoint class indices. Unconditional generators give label -1.
    `class_to_idx` aligns labels to a real ImageFolder as in `SyntheticImageFolder`. `mode` is the PIL
    mode of the returned images ("RGB" like ImageFolder, "L", or None for the generator's own channels).
    `size` (an int or (height, width)) resizes every image before `transform`; None keeps the resolution.
    `device="cuda"` with DataLoader workers needs `multiprocessing_context="spawn"`.
    """

    def __init__(self, checkpoint: str | os.PathLike, n: int, *, seed: int = 0,
                 labels: None | str | Sequence[int | str] = None, truncation: float = 1.0,
                 transform: Callable | None = None, batch_size: int = 64, device: str = "cpu",
                 class_to_idx: dict[str, int] | None = None, mode: str | None = "RGB",
                 target_transform: Callable | None = None, size: int | tuple[int, int] | None = None):
        from augment_gan.checkpoint import load_checkpoint

        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(f"n must be a non-negative integer, got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(truncation, (int, float)) or truncation < 0:
            raise UserError(f"truncation must be >= 0, got {truncation!r}")
        if mode not in (None, "RGB", "L"):
            raise UserError(f"mode must be 'RGB', 'L' or None, got {mode!r}")
        ckpt = load_checkpoint(checkpoint, device=device)  # a run directory: its newest checkpoint, checked
        self.path = ckpt.path
        self.digest = ckpt.digest
        self.n, self.seed, self.truncation = n, int(seed), float(truncation)
        self.batch_size, self.device, self.mode = batch_size, device, mode
        self.transform, self.target_transform = transform, target_transform
        self.size = as_size(size)
        self.channels, self.resolution = ckpt.channels, ckpt.resolution
        own = list(ckpt.classes) if ckpt.num_classes else []
        self.gen_labels = self._labels(labels, own)  # checkpoint class index per item, or None
        present = set(own) if self.gen_labels is None else {own[i] for i in np.unique(self.gen_labels)}
        self.class_to_idx, self.classes = align_classes(own, class_to_idx, present, f"checkpoint {self.path}")
        if self.gen_labels is None:
            self.targets = [UNLABELED] * n
        else:
            remap = np.array([self.class_to_idx[name] for name in own], dtype=np.int64)
            self.targets = remap[self.gen_labels].tolist()
        self._ckpt = ckpt  # used in this process; workers load their own (see __getstate__)
        self._cache: tuple[int, np.ndarray] | None = None

    def _labels(self, labels, own: list[str]) -> np.ndarray | None:
        if not own:
            if labels is not None:
                raise UserError("this checkpoint is unconditional; it cannot generate labels (use labels=None)")
            return None
        if labels is None or (isinstance(labels, str) and labels == "balanced"):
            return np.arange(self.n, dtype=np.int64) % len(own)
        if isinstance(labels, str):
            raise UserError(f"labels must be None, 'balanced' or a list of {self.n} labels, got {labels!r}")
        labels = list(labels)
        if len(labels) != self.n:
            raise UserError(f"labels has {len(labels)} entries for n={self.n} images")
        out = np.empty(self.n, dtype=np.int64)
        for i, label in enumerate(labels):
            if isinstance(label, str):
                if label not in own:
                    raise UserError(f"unknown class {label!r}; the checkpoint has {', '.join(own)}")
                out[i] = own.index(label)
            elif isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= label < len(own):
                out[i] = int(label)
            else:
                raise UserError(f"label {label!r} is not a class name or an index below {len(own)}")
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Workers get paths and numbers only; each loads the checkpoint itself on first use.
        state = dict(self.__dict__)
        state["_ckpt"] = None
        state["_cache"] = None
        return state

    def _checkpoint(self):
        if self._ckpt is None:
            from augment_gan.checkpoint import load_checkpoint

            ckpt = load_checkpoint(self.path, device=self.device)
            if ckpt.digest != self.digest:
                raise UserError(f"checkpoint {self.path} changed on disk since the dataset was created")
            self._ckpt = ckpt
        return self._ckpt

    def _batch(self, batch: int) -> np.ndarray:
        """uint8 N×H×W×C images of one batch of indices, cached."""
        if self._cache is not None and self._cache[0] == batch:
            return self._cache[1]
        from augment_gan.pixels import nchw_to_hwc
        from augment_gan.sample import generate

        start, stop = batch * self.batch_size, min(self.n, (batch + 1) * self.batch_size)
        indices = list(range(start, stop))
        labels = None if self.gen_labels is None else torch.from_numpy(self.gen_labels[start:stop])
        with torch.no_grad():
            images = generate(self._checkpoint(), indices, seed=self.seed, labels=labels,
                              truncation=self.truncation, device=self.device)  # uint8 N×C×H×W
        hwc = nchw_to_hwc(images)
        self._cache = (batch, hwc)
        return hwc

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        index %= self.n
        pixels = self._batch(index // self.batch_size)[index % self.batch_size]
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        if self.mode is not None and image.mode != self.mode:
            image = image.convert(self.mode)
        return apply_transforms(resize_to(image, self.size), self.targets[index], self.transform,
                                self.target_transform)

    def __repr__(self) -> str:
        return f"GeneratorDataset({str(self.path)!r}, n={self.n}, seed={self.seed})"
