"""`SyntheticTarDataset`: a set written with `synth --format tar`, read with indexed access from its tar shards.

The shards' layout is `augment_gan.tarshards`; labels, sizes and transforms follow the other synthetic datasets
(`augment_gan.datasets`), and the class is importable from there too.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from augment_gan.datasets import (
    UNLABELED,
    align_classes,
    apply_transforms,
    as_size,
    planned_empty,
    resize_to,
    synth_settings,
)
from augment_gan.errors import UserError
from augment_gan.manifest import MANIFEST, ManifestRow
from augment_gan.tarshards import SHARD_NAME, TAR_FORMAT, TAR_IMAGE_FORMAT, read_shard


class SyntheticTarDataset(Dataset):
    """Images written by `augment-gan synth --format tar`, read from the set's tar shards (`augment_gan.tarshards`).

    Item i is the image with the i-th smallest final index: the order `SyntheticImageFolder` gives the same
    set written as files, in every process and every run. Being map-style and deterministic, it works with
    any sampler: under DDP each rank builds the same index and reads only what its `DistributedSampler` (or
    `DistributedMixedSampler`) gives it. Shards are opened lazily by each process, so DataLoader workers and
    ranks have their own file handles and none is pickled.

    Labels come from the `<index>.cls` members (the checkpoint's class index), aligned to `class_to_idx` by
    class name as in `SyntheticImageFolder`; unconditional sets have label -1. `row(i)` is item i's manifest
    row (its `<index>.json` member). `mode` is the PIL mode of the returned images ("RGB" like ImageFolder,
    "L", or None for the files' own); `size` (an int or (height, width)) resizes every image before
    `transform`. Attributes: `root`, `classes`, `class_to_idx`, `targets`, `shards` (file names), `indices`
    (the final index of each item).
    """

    def __init__(self, path: str | os.PathLike, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None, *, target_transform: Callable | None = None,
                 mode: str | None = "RGB", size: int | tuple[int, int] | None = None):
        root = Path(path)
        if not root.is_dir():
            raise UserError(f"synthetic folder not found: {root}")
        if mode not in (None, "RGB", "L"):
            raise UserError(f"mode must be 'RGB', 'L' or None, got {mode!r}")
        info = synth_settings(root)
        if info.get("format") != TAR_FORMAT:
            raise UserError(f"{root} was not written by `augment-gan synth --format tar` (its synth.json says "
                            f"format {info.get('format')!r}); read it with SyntheticImageFolder")
        if not (root / MANIFEST).is_file():
            raise UserError(f"{root} has no {MANIFEST}, so the set is incomplete: run its remaining `synth --shard` "
                            "processes (or the same command again) first")
        own = list(info.get("classes") or []) if info.get("conditional") else []
        ext = "." + TAR_IMAGE_FORMAT

        self.shards = sorted(name for name in os.listdir(root) if SHARD_NAME.match(name))
        found: dict[int, list] = {}  # final index -> [shard, image offset, size, json offset, size, label]
        for s, shard in enumerate(self.shards):
            for name, offset, length, data in read_shard(root / shard, contents=(".cls",)):
                stem, dot, suffix = name.rpartition(".")
                if not dot or not stem.isdigit():
                    continue
                entry = found.setdefault(int(stem), [s, -1, 0, -1, 0, None])
                if suffix == ext[1:]:
                    entry[1:3] = offset, length
                elif suffix == "json":
                    entry[3:5] = offset, length
                elif suffix == "cls":
                    entry[5] = int(data)
        rows = np.array(sorted((k, *v[:5], -1 if v[5] is None else v[5]) for k, v in found.items()),
                        dtype=np.int64).reshape(-1, 7)
        broken = rows[(rows[:, 2] < 0) | ((rows[:, 6] < 0) if own else (rows[:, 6] >= 0)) | (rows[:, 6] >= len(own))]
        if len(broken):
            index, shard = int(broken[0, 0]), self.shards[int(broken[0, 1])]
            raise UserError(f"{root / shard}: sample {index:06d} lacks its {ext} image"
                            + (" or its .cls label (in range of synth.json's classes)" if own else
                               " or has a label, but the set is unconditional"))
        self.indices = rows[:, 0]
        self._shard, self._offset, self._size, self._json_offset, self._json_size = rows[:, 1:6].T.copy()
        labels = rows[:, 6]
        present = ({own[i] for i in np.unique(labels)} | planned_empty(info)) if own else set()
        self.class_to_idx, self.classes = align_classes(own, class_to_idx, present, f"synthetic set {root}")
        if own:
            remap = np.array([self.class_to_idx[name] for name in own], dtype=np.int64)
            self.targets = remap[labels].tolist()
        else:
            self.targets = [UNLABELED] * len(rows)
        self.root = root
        self.transform, self.target_transform = transform, target_transform
        self.mode = mode
        self.size = as_size(size)
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # a forked DataLoader worker: its own handles, not the parent's
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.root / self.shards[shard], "rb")
        f.seek(offset)
        return f.read(size)

    def __getitem__(self, index: int):
        data = self._read(int(self._shard[index]), int(self._offset[index]), int(self._size[index]))
        image = Image.open(io.BytesIO(data))
        if self.mode is not None and image.mode != self.mode:
            image = image.convert(self.mode)
        else:
            image.load()
        return apply_transforms(resize_to(image, self.size), self.targets[index], self.transform,
                                self.target_transform)

    def row(self, index: int) -> ManifestRow:
        """Item `index`'s manifest row, read from its shard."""
        if self._json_offset[index] < 0:
            raise UserError(f"{self.root}: sample {int(self.indices[index]):06d} has no .json member")
        data = self._read(int(self._shard[index]), int(self._json_offset[index]), int(self._json_size[index]))
        return ManifestRow.from_dict(json.loads(data))

    def close(self) -> None:
        """Close the shard files this process opened (they reopen on the next read)."""
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __repr__(self) -> str:
        return (f"SyntheticTarDataset({str(self.root)!r}, {len(self)} images in {len(self.shards)} shards, "
                f"{len(self.classes)} classes)")
