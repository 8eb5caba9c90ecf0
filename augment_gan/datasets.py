"""Torchvision-facing datasets: synthetic images from disk or from a generator, mixed with real ones.

Every dataset here returns `(PIL image, int label)` like `torchvision.datasets.ImageFolder`, so the
user's `transform=` (a torchvision transform or an augment-gan `Recipe`) works unchanged. None of them
augments anything itself.

Labels. A synthetic set is aligned to a real `ImageFolder` by class *name*: pass
`class_to_idx=real.class_to_idx`. A synthetic class the real set lacks is an error (its label would be
meaningless); a real class with no synthetic images is only a warning, because generating some classes
on purpose (the rare ones) is a normal use. Unconditional (unlabeled) synthetic images have label -1 and
cannot be aligned to classes.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from augment_gan.errors import UserError

UNLABELED = -1
"""Label of images from an unconditional generator."""


def default_loader(path: str | Path) -> Image.Image:
    """Open an image the way torchvision's `ImageFolder` does by default: decoded and converted to RGB.

    Matching ImageFolder matters more than keeping grayscale: real and synthetic samples end up in the
    same batch, so they must have the same number of channels. Pass `loader=` (the same one you give
    ImageFolder) to read grayscale instead, e.g. `lambda p: Image.open(p).convert("L")`.
    """
    with open(path, "rb") as f:
        image = Image.open(f)
        return image.convert("RGB")


def _align_classes(own: list[str], class_to_idx: dict[str, int] | None, present: set[str], what: str
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

MANIFEST_KEYS = ("file", "class", "label", "kept")


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object")
            missing = [k for k in MANIFEST_KEYS if k not in record]
            if missing:
                raise UserError(f"{path}:{number}: missing key(s) {', '.join(missing)}")
            file = record["file"]
            if file is None and record["kept"] is False:
                # A candidate synth's filters rejected (--keep-top/--dedup): decided, never written.
                record["_line"] = number
                records.append(record)
                continue
            # Manifest paths must stay inside the folder: a manifest is data, not a way to read other files.
            if not isinstance(file, str) or not file or PurePosixPath(file).is_absolute() \
                    or ".." in PurePosixPath(file).parts or "\\" in file:
                raise UserError(f"{path}:{number}: 'file' must be a relative path inside the folder, got {file!r}")
            record["_line"] = number
            records.append(record)
    return records



def _transformed(image, target, transform, target_transform):
    """(transform(image), target_transform(target)), each only when given: torchvision's convention."""
    if transform is not None:
        image = transform(image)
    if target_transform is not None:
        target = target_transform(target)
    return image, target

class SyntheticImageFolder(Dataset):
    """Images written by `augment-gan synth`, read through its `manifest.jsonl`.

    Only images marked `kept: true` that exist on disk are used (filtered and deleted files are skipped,
    with a warning for the deleted ones). Labels follow `class_to_idx` (normally the real
    `ImageFolder`'s), matched by class name; without it they follow the checkpoint's class order, which
    for a generator trained on that folder is the same as ImageFolder's. Unconditional sets have label -1.

    Attributes mirror ImageFolder: `root`, `classes`, `class_to_idx`, `samples` (list of (path, label)),
    `targets`, `imgs`; plus `records`, the manifest entry of each sample.
    """

    def __init__(self, path: str | os.PathLike, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None, *, target_transform: Callable | None = None,
                 loader: Callable[[str], Any] = default_loader):
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"synthetic folder not found: {root}")
        manifest = root / "manifest.jsonl"
        if not manifest.is_file():
            raise UserError(f"{root} has no manifest.jsonl, so it was not written by `augment-gan synth` "
                            "(for a plain folder of images use torchvision's ImageFolder)")
        records = _read_manifest(manifest)
        info = {}
        if (root / "synth.json").is_file():
            try:
                info = json.loads((root / "synth.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{root / 'synth.json'}: not valid JSON ({exc.msg})") from None

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

        kept = [r for r in records if r["kept"] is True]
        usable = [r for r in kept if (root / r["file"]).is_file()]
        if len(usable) < len(kept):
            warnings.warn(f"{len(kept) - len(usable)} image(s) marked kept in {manifest} are missing on disk; "
                          "skipping them", stacklevel=2)
        self.class_to_idx, self.classes = _align_classes(
            own, class_to_idx, {r["class"] for r in usable}, f"synthetic set {root}")

        self.root = root
        self.transform = transform
        self.target_transform = target_transform
        self.loader = loader
        self.records = usable
        self.samples = [(str(root / r["file"]), self.class_to_idx[r["class"]] if conditional else UNLABELED)
                        for r in usable]
        self.targets = [label for _, label in self.samples]
        self.imgs = self.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return _transformed(self.loader(path), target, self.transform, self.target_transform)

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
    `device="cuda"` with DataLoader workers needs `multiprocessing_context="spawn"`.
    """

    def __init__(self, checkpoint: str | os.PathLike, n: int, *, seed: int = 0,
                 labels: None | str | Sequence[int | str] = None, truncation: float = 1.0,
                 transform: Callable | None = None, batch_size: int = 64, device: str = "cpu",
                 class_to_idx: dict[str, int] | None = None, mode: str | None = "RGB",
                 target_transform: Callable | None = None):
        from augment_gan.checkpoint import load_checkpoint, resolve_checkpoint

        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(f"n must be a non-negative integer, got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(truncation, (int, float)) or truncation < 0:
            raise UserError(f"truncation must be >= 0, got {truncation!r}")
        if mode not in (None, "RGB", "L"):
            raise UserError(f"mode must be 'RGB', 'L' or None, got {mode!r}")
        self.path = resolve_checkpoint(checkpoint)
        ckpt = load_checkpoint(self.path, device=device)
        self.digest = ckpt.digest
        self.n, self.seed, self.truncation = n, int(seed), float(truncation)
        self.batch_size, self.device, self.mode = batch_size, device, mode
        self.transform, self.target_transform = transform, target_transform
        self.channels, self.resolution = ckpt.channels, ckpt.resolution
        own = list(ckpt.classes) if ckpt.num_classes else []
        self.gen_labels = self._labels(labels, own)  # checkpoint class index per item, or None
        present = set(own) if self.gen_labels is None else {own[i] for i in np.unique(self.gen_labels)}
        self.class_to_idx, self.classes = _align_classes(own, class_to_idx, present, f"checkpoint {self.path}")
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
        return _transformed(image, self.targets[index], self.transform, self.target_transform)

    def __repr__(self) -> str:
        return f"GeneratorDataset({str(self.path)!r}, n={self.n}, seed={self.seed})"


# ----------------------------------------------------------------------------------------------------------
# Mixing real and synthetic data.

def _class_to_idx(dataset) -> dict[str, int] | None:
    while dataset is not None:  # look through torch.utils.data.Subset
        mapping = getattr(dataset, "class_to_idx", None)
        if mapping is not None:
            return mapping
        dataset = getattr(dataset, "dataset", None)
    return None


class MixedDataset(Dataset):
    """Real and synthetic datasets side by side, to be read through `MixedSampler` (or its DDP variant).

    Indices `0 .. len(real)-1` are real samples, the next `len(synthetic)` synthetic ones. The sampler,
    not the dataset size, sets the proportion: `ratio` is the share of synthetic samples in every epoch
    and every batch, whatever the two sets' sizes (a plain shuffling DataLoader would instead use the
    sets' natural proportion). Both sets must number their classes the same way.
    """

    def __init__(self, real: Dataset, synthetic: Dataset | None, ratio: float):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise UserError(f"ratio must be in [0, 1), got {ratio!r}")
        n_real, n_synthetic = len(real), (0 if synthetic is None else len(synthetic))
        if n_real == 0:
            raise UserError("the real dataset is empty")
        if ratio > 0 and n_synthetic == 0:
            raise UserError(f"ratio is {ratio} but the synthetic dataset is empty")
        real_map, synthetic_map = _class_to_idx(real), _class_to_idx(synthetic)
        if real_map and synthetic_map is not None and synthetic_map != real_map:
            if not synthetic_map:
                raise UserError("the synthetic set is unlabeled (unconditional generator) but the real set "
                                f"has {len(real_map)} classes")
            raise UserError("real and synthetic datasets number their classes differently "
                            f"(real {real_map}, synthetic {synthetic_map}); "
                            "pass class_to_idx=real.class_to_idx when creating the synthetic dataset")
        self.real, self.synthetic, self.ratio = real, synthetic, float(ratio)
        self.n_real, self.n_synthetic = n_real, n_synthetic
        self.class_to_idx = real_map
        self.classes = getattr(real, "classes", None)

    @property
    def synthetic_per_epoch(self) -> int:
        """round(ratio / (1 - ratio) × len(real)): an epoch shows every real image once plus this many synthetic."""
        return round(self.ratio / (1 - self.ratio) * self.n_real)

    def is_synthetic(self, index: int) -> bool:
        return index >= self.n_real

    def __len__(self) -> int:
        return self.n_real + self.n_synthetic

    def __getitem__(self, index: int):
        if index < 0 or index >= len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        if index < self.n_real:
            return self.real[index]
        return self.synthetic[index - self.n_real]


def _generator(*entropy: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _synthetic_stream(n_synthetic: int, start: int, count: int, seed: int) -> torch.Tensor:
    """Items start .. start+count-1 of an endless sequence of shuffled passes over the synthetic set.

    Successive epochs continue the sequence, so a synthetic set larger than one epoch's share is used in
    full before any image repeats, and a smaller one repeats evenly.
    """
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    first, last = start // n_synthetic, (start + count - 1) // n_synthetic
    passes = torch.cat([torch.randperm(n_synthetic, generator=_generator(seed, 1, p)) for p in range(first, last + 1)])
    offset = start - first * n_synthetic
    return passes[offset: offset + count]


def _interleave(real: torch.Tensor, synthetic: torch.Tensor) -> list[int]:
    """Spread the synthetic indices evenly among the real ones, so that any run of k consecutive indices
    (a batch) holds k × share synthetic ones, ±1."""
    n_r, n_s = len(real), len(synthetic)
    total = n_r + n_s
    j = torch.arange(total)
    is_synthetic = ((j + 1) * n_s // total) > (j * n_s // total)
    order = torch.empty(total, dtype=torch.long)
    order[is_synthetic] = synthetic
    order[~is_synthetic] = real
    return order.tolist()


def _pad(indices: torch.Tensor, multiple: int) -> torch.Tensor:
    """Repeat from the start so the length divides evenly among ranks (as DistributedSampler does)."""
    extra = (-len(indices)) % multiple
    if extra == 0 or len(indices) == 0:
        return indices
    return torch.cat([indices, indices.repeat(math.ceil(extra / len(indices)))[:extra]])


class MixedSampler(Sampler[int]):
    """Sample a `MixedDataset` so every epoch and every batch holds the recipe's real:synthetic share.

    One epoch = every real image once (shuffled) + `dataset.synthetic_per_epoch` synthetic images, spread
    evenly through the epoch: a batch of B holds B × ratio synthetic samples, ±1. Synthetic images are
    drawn without replacement, continuing across epochs. The order is a function of (seed, epoch); the
    epoch advances by itself on each pass, or set it with `set_epoch`.
    """

    def __init__(self, dataset: MixedDataset, *, seed: int = 0):
        if not isinstance(dataset, MixedDataset):
            raise UserError(f"MixedSampler needs a MixedDataset, got {type(dataset).__name__}")
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
        ds = self.dataset
        per_epoch = ds.synthetic_per_epoch
        real = _pad(torch.randperm(ds.n_real, generator=_generator(self.seed, 0, epoch)), world)[rank::world]
        synthetic = _pad(_synthetic_stream(ds.n_synthetic, epoch * per_epoch, per_epoch, self.seed), world)[rank::world]
        return _interleave(real, synthetic + ds.n_real)

    def __iter__(self):
        order = self._order(self.epoch)
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return self.dataset.n_real + self.dataset.synthetic_per_epoch


class DistributedMixedSampler(MixedSampler):
    """`MixedSampler` for DistributedDataParallel: each of `num_replicas` ranks gets its own share.

    All ranks build the same epoch from (seed, epoch) and take disjoint slices of the real and the
    synthetic indices, so every rank's batches hold the same real:synthetic share. Like
    `DistributedSampler`, the epoch is padded (by repeating a few indices) to divide evenly; call
    `set_epoch(epoch)` at the start of each epoch on every rank (it also advances by itself).
    """

    def __init__(self, dataset: MixedDataset, *, num_replicas: int | None = None, rank: int | None = None,
                 seed: int = 0):
        super().__init__(dataset, seed=seed)
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise UserError("pass num_replicas and rank, or initialise torch.distributed first")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise UserError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.num_replicas, self.rank = int(num_replicas), int(rank)

    def __iter__(self):
        order = self._order(self.epoch, self.rank, self.num_replicas)
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return (math.ceil(self.dataset.n_real / self.num_replicas)
                + math.ceil(self.dataset.synthetic_per_epoch / self.num_replicas))
