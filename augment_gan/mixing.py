"""Real and synthetic data in one stream: `MixedDataset` (one index space, one image size) and the samplers
that hold the recipe's real:synthetic share in every epoch and batch, or balance the classes."""
from __future__ import annotations

import contextlib
import copy
import math
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler, Subset

from augment_gan.datasets import UNLABELED, GeneratorDataset, SyntheticImageFolder
from augment_gan.errors import UserError
from augment_gan.tardataset import SyntheticTarDataset

# ----------------------------------------------------------------------------------------------------------
# One image size. A generator makes 32 px images and up, MNIST is 28 px: without this, the first batch
# would be a torch.stack error. Sizes are measured on item 0 after its transform, so transforms that
# resize by themselves (torchvision's Resize) are left alone and only a real difference is acted on.

@contextlib.contextmanager
def _random_state_kept():
    """Restore Python's, numpy's and torch's global random streams afterwards (torchvision transforms draw on them)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _spatial_size(image: Any) -> tuple[int, int] | None:
    """(height, width) of a C×H×W tensor, an H×W(×C) array or a PIL image; None for anything else."""
    if isinstance(image, torch.Tensor) and image.ndim >= 2:
        return int(image.shape[-2]), int(image.shape[-1])
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return int(image.shape[0]), int(image.shape[1])
    if hasattr(image, "size") and hasattr(image, "mode"):  # PIL
        return int(image.size[1]), int(image.size[0])
    return None


def _output_size(dataset: Dataset) -> tuple[tuple[int, int] | None, bool]:
    """(height, width) of item 0 as a DataLoader gets it, and whether default collation stacks it (a tensor
    or an array; PIL images need the user's own collate). Measured on copies, so no random stream that
    training draws from moves. (None, False) when it cannot be told."""
    index = 0
    while isinstance(dataset, Subset):
        index, dataset = dataset.indices[index], dataset.dataset
    if not hasattr(dataset, "transform"):
        return None, False  # the transform may be anywhere (e.g. ConcatDataset's parts): do not run it
    try:
        plain = copy.copy(dataset)
        plain.transform = None
        with _random_state_kept():
            image = plain[index][0]
            if dataset.transform is not None:
                image = copy.deepcopy(dataset.transform)(image)
    except Exception:  # noqa: BLE001 - best effort: an unusual dataset keeps its own behaviour and errors
        return None, False
    return _spatial_size(image), isinstance(image, (torch.Tensor, np.ndarray))


def _with_size(dataset: Dataset, size: tuple[int, int]) -> Dataset:
    """A copy of a synthetic dataset (or a Subset of one) that resizes its images to `size` (H, W)."""
    if isinstance(dataset, Subset):
        return Subset(_with_size(dataset.dataset, size), dataset.indices)
    resized = copy.copy(dataset)
    resized.size = size
    return resized


def _hw(size: tuple[int, int] | None) -> str:
    return "unknown" if size is None else f"{size[1]}×{size[0]}"


def match_size(real: Dataset, synthetic: Dataset) -> tuple[Dataset, tuple[int, int] | None]:
    """(synthetic dataset whose items come out the real items' size, that size (H, W) or None if unknown).

    A `SyntheticImageFolder`, `SyntheticTarDataset` or `GeneratorDataset` without `size=` is copied with `size`
    set to the real size; one given another `size=` explicitly, or another dataset whose tensors differ, is a
    UserError.
    Other datasets whose PIL images differ are left to the user's collate function (size None).
    """
    real_size, real_stacks = _output_size(real)
    synth_size, synth_stacks = _output_size(synthetic)
    if real_size is None or synth_size is None or real_size == synth_size:
        return synthetic, real_size
    inner = synthetic
    while isinstance(inner, Subset):
        inner = inner.dataset
    if isinstance(inner, (SyntheticImageFolder, SyntheticTarDataset, GeneratorDataset)):
        if inner.size is not None:
            raise UserError(f"the synthetic images come out {_hw(synth_size)} (size={inner.size} was asked for) "
                            f"but the real ones {_hw(real_size)}; leave size unset to use the real images' size")
        resized = _with_size(synthetic, real_size)
        resized_size, _ = _output_size(resized)
        if resized_size == real_size:
            return resized, real_size
        raise UserError(f"the synthetic images come out {_hw(resized_size)} even when read at the real images' "
                        f"{_hw(real_size)}: the synthetic transform sets its own size; make both give one size")
    if real_stacks and synth_stacks:
        raise UserError(f"the real images come out {_hw(real_size)} but the synthetic ones {_hw(synth_size)}; read "
                        "the synthetic set with SyntheticImageFolder or GeneratorDataset (they follow the real "
                        "size) or resize both to one size in their transforms")
    return synthetic, None


# ----------------------------------------------------------------------------------------------------------
# Mixing real and synthetic data.

def _class_to_idx(dataset) -> dict[str, int] | None:
    while dataset is not None:  # look through torch.utils.data.Subset
        mapping = getattr(dataset, "class_to_idx", None)
        if mapping is not None:
            return mapping
        dataset = getattr(dataset, "dataset", None)
    return None


def _targets(dataset: Dataset) -> list | None:
    """The labels a dataset states without decoding images (`targets`, as ImageFolder and the synthetic
    datasets here have), also through `Subset` and `ConcatDataset`; None when it states none."""
    if isinstance(dataset, Subset):
        inner = _targets(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        parts = [_targets(part) for part in dataset.datasets]
        return None if any(part is None for part in parts) else [v for part in parts for v in part]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    return targets.tolist() if isinstance(targets, (torch.Tensor, np.ndarray)) else list(targets)


def _labels(dataset: Dataset, what: str) -> np.ndarray:
    """The class label of every item of the `what` ("real" or "synthetic") set, as int64 N.

    Read from `targets` where the dataset has them; any other dataset is read item by item (decoding its
    images, with no random stream moved). Unlabeled items (label -1, or items that are not (image, label)
    pairs) are a UserError: balancing needs classes.
    """
    values = _targets(dataset)
    if values is None:
        with _random_state_kept():
            items = [dataset[i] for i in range(len(dataset))]
        if not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items):
            raise UserError(f"balance=True needs labeled {what} images, but the {what} set's items are not "
                            "(image, label) pairs")
        values = [item[1] for item in items]
    if not all((isinstance(v, (int, np.integer)) and not isinstance(v, bool))
               or (isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point()) for v in values):
        raise UserError(f"balance=True needs integer class labels, but the {what} set's labels are not")
    labels = np.array([int(v) for v in values], dtype=np.int64)
    if (labels == UNLABELED).any():
        raise UserError(f"balance=True needs labeled {what} images, but the {what} set is unlabeled (label -1, "
                        "an unconditional generator); use balance=False")
    if (labels < 0).any():
        raise UserError(f"the {what} set has negative labels ({int(labels.min())}); class labels must be >= 0")
    return labels


class MixedDataset(Dataset):
    """Real and synthetic datasets side by side, to be read through `MixedSampler` (or its DDP variant).

    Indices `0 .. len(real)-1` are real samples, the next `len(synthetic)` synthetic ones. The sampler,
    not the dataset size, sets the proportion: `ratio` is the share of synthetic samples in every epoch
    and every batch, whatever the two sets' sizes (a plain shuffling DataLoader would instead use the
    sets' natural proportion). Both sets must number their classes the same way.

    `balance=True` balances the classes instead (for long-tailed folders): every epoch holds `per_class`
    samples of each real class, `per_class` being the largest real class's size n_max. A class of n_c
    images shows each of them once and fills its shortfall n_max - n_c with distinct synthetic images of
    that class; only when those run out does it repeat its real images (as evenly as possible). Synthetic
    images are taken in turn across epochs, so a class with more than it needs uses them all before one
    repeats. The class sizes then set the synthetic share, so `ratio` must be left unset (`self.ratio` is
    the share that results); `synthetic=None` balances by repeating real images alone. Classes are the
    real set's labels (`targets`, read without decoding images); synthetic images of other labels are not
    drawn, and an unlabeled set (label -1) is a UserError.

    Every item comes out one size, the real images' (`size`, (height, width) after the transforms; None
    when it cannot be measured). A `SyntheticImageFolder` or `GeneratorDataset` of another size is read
    at the real size (`synthetic` then holds a resized copy of it, see `match_size`); a size mismatch
    that cannot be resized away is a UserError naming both sizes.
    """

    def __init__(self, real: Dataset, synthetic: Dataset | None, ratio: float | None = None, *,
                 balance: bool = False):
        if not isinstance(balance, bool):
            raise UserError(f"balance must be True or False, got {balance!r}")
        if balance and ratio is not None:
            # Two answers to one question (how many synthetic images): refuse rather than pick one silently.
            raise UserError(f"balance=True sets the synthetic share from the class sizes (each class is filled up "
                            f"to the largest one, synthetic images first); leave ratio unset (got {ratio!r})")
        if not balance and ratio is None:
            raise UserError("pass ratio, the share of synthetic samples (e.g. recipe.ratio), or balance=True")
        if not balance and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
            raise UserError(f"ratio must be in [0, 1), got {ratio!r}")
        n_real, n_synthetic = len(real), (0 if synthetic is None else len(synthetic))
        if n_real == 0:
            raise UserError("the real dataset is empty")
        if not balance and ratio > 0 and n_synthetic == 0:
            raise UserError(f"ratio is {ratio} but the synthetic dataset is empty")
        real_map, synthetic_map = _class_to_idx(real), _class_to_idx(synthetic)
        if real_map and synthetic_map is not None and synthetic_map != real_map:
            if not synthetic_map:
                raise UserError("the synthetic set is unlabeled (unconditional generator) but the real set "
                                f"has {len(real_map)} classes")
            raise UserError("real and synthetic datasets number their classes differently "
                            f"(real {real_map}, synthetic {synthetic_map}); "
                            "pass class_to_idx=real.class_to_idx when creating the synthetic dataset")
        self.size = None
        if n_synthetic:
            synthetic, self.size = match_size(real, synthetic)
        self.real, self.synthetic = real, synthetic
        self.n_real, self.n_synthetic = n_real, n_synthetic
        self.class_to_idx = real_map
        self.classes = getattr(real, "classes", None)
        self.balance = balance
        self.per_class: int | None = None  # samples of each class per epoch, with balance
        if balance:
            self._balance_classes()
        else:
            self.ratio = float(ratio)

    def _balance_classes(self) -> None:
        """Group the real and synthetic indices by class; set `per_class` and the resulting `ratio`."""
        real_labels = _labels(self.real, "real")
        synthetic_labels = _labels(self.synthetic, "synthetic") if self.n_synthetic else np.zeros(0, np.int64)
        self._class_labels = np.unique(real_labels)  # sorted
        self._real_by_class = [torch.from_numpy(np.flatnonzero(real_labels == c)) for c in self._class_labels]
        self._synthetic_by_class = [torch.from_numpy(np.flatnonzero(synthetic_labels == c)) for c in self._class_labels]
        self.per_class = max(len(r) for r in self._real_by_class)
        self._synthetic_drawn = [min(self.per_class - len(r), len(s))
                                 for r, s in zip(self._real_by_class, self._synthetic_by_class)]
        self.ratio = sum(self._synthetic_drawn) / self.per_epoch

    @property
    def synthetic_per_epoch(self) -> int:
        """Synthetic samples in one epoch: round(ratio / (1 - ratio) × len(real)), as an epoch shows every real
        image once plus this many synthetic; with balance, the sum over classes of min(shortfall, synthetic
        images of the class)."""
        if self.balance:
            return sum(self._synthetic_drawn)
        return round(self.ratio / (1 - self.ratio) * self.n_real)

    @property
    def per_epoch(self) -> int:
        """Samples in one epoch of `MixedSampler`: len(real) + synthetic_per_epoch, or per_class × classes."""
        if self.balance:
            return self.per_class * len(self._class_labels)
        return self.n_real + self.synthetic_per_epoch

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


def _window(items: torch.Tensor, count: int, epoch: int, *entropy: int) -> torch.Tensor:
    """`count` of `items` for this epoch: the next `count` positions (wrapping around) of one fixed shuffled
    order, continuing where the previous epoch stopped. So they are distinct while count <= len(items),
    each is used equally often (±1) otherwise, and over the epochs every item takes its turn."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    order = items[torch.randperm(len(items), generator=_generator(*entropy))]
    return order[(epoch * count + torch.arange(count)) % len(items)]


def _balanced_epoch(ds: MixedDataset, seed: int, epoch: int) -> torch.Tensor:
    """One class-balanced epoch (indices into `ds`, shuffled): per class, its real images once, then synthetic
    images of the class up to `ds.per_class`, then repeats of its real images if those run out."""
    parts = []
    for label, real, synthetic, drawn in zip(ds._class_labels.tolist(), ds._real_by_class, ds._synthetic_by_class,
                                             ds._synthetic_drawn):
        repeats = ds.per_class - len(real) - drawn
        parts += [real, ds.n_real + _window(synthetic, drawn, epoch, seed, 2, label),
                  _window(real, repeats, epoch, seed, 3, label)]
    order = torch.cat(parts)
    return order[torch.randperm(len(order), generator=_generator(seed, 4, epoch))]


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

    With `MixedDataset(..., balance=True)` an epoch is `dataset.per_class` samples of every class (see
    `MixedDataset`), shuffled together: balanced per epoch, and per batch on average.
    """

    def __init__(self, dataset: MixedDataset, *, seed: int = 0):
        if not isinstance(dataset, MixedDataset):
            raise UserError(f"MixedSampler needs a MixedDataset, got {type(dataset).__name__}")
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
        ds = self.dataset
        if ds.balance:
            return _pad(_balanced_epoch(ds, self.seed, epoch), world)[rank::world].tolist()
        per_epoch = ds.synthetic_per_epoch
        real = _pad(torch.randperm(ds.n_real, generator=_generator(self.seed, 0, epoch)), world)[rank::world]
        synthetic = _pad(_synthetic_stream(ds.n_synthetic, epoch * per_epoch, per_epoch, self.seed), world)[rank::world]
        return _interleave(real, synthetic + ds.n_real)

    def __iter__(self):
        order = self._order(self.epoch)
        self.epoch += 1
        return iter(order)

    def __len__(self) -> int:
        return self.dataset.per_epoch


class DistributedMixedSampler(MixedSampler):
    """`MixedSampler` for DistributedDataParallel: each of `num_replicas` ranks gets its own share.

    All ranks build the same epoch from (seed, epoch) and take disjoint slices of the real and the
    synthetic indices, so every rank's batches hold the same real:synthetic share (with balance, disjoint
    slices of the one shuffled, class-balanced epoch). Like `DistributedSampler`, the epoch is padded (by
    repeating a few indices) to divide evenly; call `set_epoch(epoch)` at the start of each epoch on every
    rank (it also advances by itself).
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
        if self.dataset.balance:
            return math.ceil(self.dataset.per_epoch / self.num_replicas)
        return (math.ceil(self.dataset.n_real / self.num_replicas)
                + math.ceil(self.dataset.synthetic_per_epoch / self.num_replicas))
