"""The training folder as fit's loop reads it: the cached images (memory-mapped, or on the GPU when they
fit), the labels of a conditional run, and what the checkpoint records about the folder."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from augment_gan.config import TrainConfig
from augment_gan.data import ReadOptions, load_folder
from augment_gan.errors import UserError
from augment_gan.pixels import hwc_to_nchw
from augment_gan.runmeta import DataInfo, RunMeta

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


def load_training_set(folder, config: TrainConfig, cache: Path, progress: bool, rank: int, world: int
                       ) -> TrainingSet:
    """Rank 0 decodes the folder and fills the cache first; the other ranks then memory-map it."""
    options = ReadOptions(resolution=config.resolution, fit=config.fit, background=tuple(config.background))
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
