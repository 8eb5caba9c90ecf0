"""The training folder as fit's loop reads it: the cached images (memory-mapped, or on the GPU when they
fit), the labels of a conditional run, and what the checkpoint records about the folder. With `fit --labels`,
the labeled images plus the confidently pseudo-labelled ones (`augment_gan.pseudolabel`)."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from augment_gan.atomic import open_atomic
from augment_gan.cache import npy_header
from augment_gan.config import TrainConfig
from augment_gan.data import ImageSet, ReadOptions, load_folder
from augment_gan.decode import warn
from augment_gan.errors import UserError, os_error_message
from augment_gan.pixels import hwc_to_nchw
from augment_gan.pseudolabel import LabelerConfig, PseudoLabels, check_channels, pseudo_label, read_labeled
from augment_gan.runmeta import DataInfo, LabelsInfo, RunMeta

_log = logging.getLogger(__name__)


@dataclass
class TrainingSet:
    """The training folder decoded to uint8 N×R×R×C, with the labels a conditional run trains on."""

    data: np.ndarray                   # N×R×R×C uint8, memory-mapped from the cache (augment_gan.data)
    labels: torch.Tensor | None        # N, int64; None when the run is unconditional
    classes: list[str]                 # the classes G draws (empty when unconditional)
    info: DataInfo

    @property
    def conditional(self) -> bool:
        return self.labels is not None


def _read_options(config: TrainConfig) -> ReadOptions:
    return ReadOptions(resolution=config.resolution, fit=config.fit, background=tuple(config.background))


def load_training_set(folder, config: TrainConfig, cache: Path, progress: bool, rank: int, world: int
                       ) -> TrainingSet:
    """Rank 0 decodes the folder and fills the cache first; the other ranks then memory-map it."""
    options = _read_options(config)
    if rank == 0:
        images = load_folder(folder, options, cache_dir=cache, progress=progress)
    if world > 1:
        dist.barrier()
    if rank != 0:
        images = load_folder(folder, options, cache_dir=cache, progress=False)
    data = images.images  # a memory map: batches are read from it, the folder is never copied into memory
    conditional = bool(config.conditional and images.labels is not None and len(images.classes) > 1)
    counts = (np.bincount(np.asarray(images.labels), minlength=len(images.classes)).tolist()
              if images.labels is not None else [])
    info = DataInfo(root=str(Path(folder).resolve()), images=int(data.shape[0]), channels=int(data.shape[3]),
                    classes=tuple(images.classes), skipped=len(images.skipped), class_counts=tuple(counts))
    labels = torch.from_numpy(np.asarray(images.labels, dtype=np.int64)) if conditional else None
    return TrainingSet(data, labels, list(images.classes) if conditional else [], info)


def load_labeled_training_set(folder, labels_dir, labeler: LabelerConfig, config: TrainConfig, record: Path,
                              cache: Path, progress: bool, rank: int, world: int, *, resume: bool,
                              device: str = "cpu") -> TrainingSet:
    """`fit FOLDER --labels LABELS_DIR`: every image of LABELS_DIR with its class, then the images of FOLDER that
    the classifier trained on LABELS_DIR labels with confidence >= `labeler.confidence` (`augment_gan.pseudolabel`);
    an image of FOLDER with the same pixels as one of LABELS_DIR is trained on once, as the labeled one. The labels
    go to `record` (RUN/pseudo_labels.json) before training; with `resume` they are read from it instead (never
    labelled again). Rank 0 labels and fills the cache; the other ranks then read the record and map the cache."""
    if rank == 0:
        train_set = _labeled_set(folder, labels_dir, labeler, config, record, cache, progress, resume, device)
    if world > 1:
        dist.barrier()
    if rank != 0:
        train_set = _labeled_set(folder, labels_dir, labeler, config, record, cache, False, True, device)
    return train_set


def _labeled_set(folder, labels_dir, labeler: LabelerConfig, config: TrainConfig, record: Path, cache: Path,
                 progress: bool, reuse: bool, device: str) -> TrainingSet:
    options = _read_options(config)
    labeled = read_labeled(labels_dir, options, cache_dir=cache)  # the small folder first: its problems before any work
    unlabeled = load_folder(folder, options, cache_dir=cache, progress=progress)
    check_channels(labeled, unlabeled.channels, against=f"the training folder {unlabeled.root}")
    if reuse:
        pseudo = PseudoLabels.read(record)
        pseudo.check_same(unlabeled, labeled, labeler.confidence, record)
        unknown = sum(f not in pseudo.predicted and f not in pseudo.duplicates for f in unlabeled.files)
        if unknown:
            _log.warning(f"{unknown} images of {unlabeled.root} are not in {record} (added since the run started); "
                         "the run does not train on them")
    else:
        pseudo = pseudo_label(unlabeled, labeled, labeler, seed=config.seed, device=device, progress=progress)
        pseudo.write(record)
    kept, index = pseudo.kept(), {c: i for i, c in enumerate(labeled.classes)}
    picked = [(i, index[kept[f]]) for i, f in enumerate(unlabeled.files) if f in kept]
    idx = np.array([i for i, _ in picked], dtype=np.int64)
    y = np.concatenate([np.asarray(labeled.labels, dtype=np.int64), np.array([c for _, c in picked], dtype=np.int64)])
    data = _joined(cache, labeled, unlabeled, idx)
    accuracy = (pseudo.classifier.get("held_out") or {}).get("accuracy")
    info = DataInfo(root=str(unlabeled.root), images=int(data.shape[0]), channels=int(data.shape[3]),
                    classes=tuple(labeled.classes), skipped=len(unlabeled.skipped) + len(labeled.skipped),
                    class_counts=tuple(np.bincount(y, minlength=len(labeled.classes)).tolist()),
                    labels=LabelsInfo(root=str(labeled.root), confidence=pseudo.confidence,
                                      labeled_images=len(labeled), pseudo_counts=pseudo.kept_counts(),
                                      classifier_accuracy=accuracy))
    return TrainingSet(data, torch.from_numpy(y), list(labeled.classes), info)


def _joined(cache: Path, labeled: ImageSet, unlabeled: ImageSet, idx: np.ndarray) -> np.ndarray:
    """uint8 N×R×R×C: the labeled images, then the unlabeled ones at `idx`. Written once into the cache and
    memory-mapped like a folder (the unlabeled folder may not fit in memory); in memory when there is no cache."""
    shape = (len(labeled) + len(idx), *labeled.images.shape[1:])
    if labeled.cache_file is None or unlabeled.cache_file is None:
        return np.concatenate([np.asarray(labeled.images), np.asarray(unlabeled.images[idx])])
    key = hashlib.sha256(json.dumps([labeled.cache_file.name, unlabeled.cache_file.name]).encode() + idx.tobytes())
    path = cache / f"labeled-set-{key.hexdigest()[:24]}.npy"
    try:
        existing = np.load(path, mmap_mode="r", allow_pickle=False)
        if existing.shape == shape and existing.dtype == np.uint8:
            return existing
    except (OSError, ValueError):
        pass
    try:
        with open_atomic(path, durable=False) as fp:  # a lost entry only costs writing it again
            fp.write(npy_header(shape))
            fp.write(np.ascontiguousarray(labeled.images).tobytes())
            for start in range(0, len(idx), 4096):  # bounded memory: 50 MB at 64 px RGB
                fp.write(np.ascontiguousarray(unlabeled.images[idx[start:start + 4096]]).tobytes())
    except OSError as exc:
        warn(f"could not write {path} ({os_error_message(exc)}); holding the training images in memory")
        return np.concatenate([np.asarray(labeled.images), np.asarray(unlabeled.images[idx])])
    return np.load(path, mmap_mode="r", allow_pickle=False)


def check_same_labels(old: RunMeta, labels_dir) -> None:
    """`--resume` gives `--labels` exactly when the run was started with them."""
    trained = old.data.labels
    if trained is not None and labels_dir is None:
        raise UserError(f"--resume: this run trains on pseudo-labels from --labels {trained.root}; pass it again")
    if trained is None and labels_dir is not None:
        raise UserError("--resume: this run was started without --labels; resume it without them")


class MappedImages:
    """Training images indexed per batch from the memory-mapped cache: `images[idx]` (idx a CPU int64
    tensor) -> uint8 N×C×R×R tensor. Only the batch is copied, so memory does not grow with the folder."""

    device = torch.device("cpu")

    def __init__(self, data: np.ndarray):
        self.data = data  # uint8 N×R×R×C

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return hwc_to_nchw(np.asarray(self.data[idx.numpy()]))


TO_DEVICE_CHUNK = 4096  # images per host-to-GPU copy: 50 MB at 64 px RGB, whatever the folder's size


def images_on(dev: torch.device, data: np.ndarray) -> torch.Tensor | MappedImages:
    """The training images (uint8 N×R×R×C) as the loop indexes them: uint8 N×C×R×R on the GPU when they take
    at most half its free memory (no copy per step), copied there in chunks; else read per batch from the map."""
    if dev.type == "cuda" and data.nbytes <= torch.cuda.mem_get_info(dev)[0] // 2:
        n, r, _, c = data.shape
        out = torch.empty((n, c, r, r), dtype=torch.uint8, device=dev)
        for start in range(0, n, TO_DEVICE_CHUNK):
            out[start:start + TO_DEVICE_CHUNK] = hwc_to_nchw(data[start:start + TO_DEVICE_CHUNK]).to(dev)
        return out
    return MappedImages(data)


def check_same_data(old: RunMeta, train_set: TrainingSet) -> None:
    if list(old.classes) != train_set.classes or old.channels != train_set.info.channels:
        raise UserError(f"--resume: the folder's classes/channels differ from the run's "
                        f"({list(old.classes)}, {old.channels} channels)")
    if old.data.images != train_set.info.images:
        _log.warning(f"the folder now has {train_set.info.images} images (the run started with "
                     f"{old.data.images}); resuming is no longer exact")
