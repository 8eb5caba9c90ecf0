"""Merge real and synthetic images into one augmented ImageFolder on disk, for tools outside Python.

The output holds `copies` augmented versions of every real image (the recipe's real pipeline) plus
synthetic images in the recipe's real:synthetic ratio within every class (its synthetic pipeline), all at
one resolution and channel count so any trainer can read the folder as is. With `balance`, every class is
instead filled up to the largest one: synthetic images of the class first, then further real copies
(copy >= `copies`) if those run out.

    OUT/<class>/real-<i:06d>-<copy>.png       i = index of the real image in the sorted folder
    OUT/<class>/synth-<index:06d>-<pass>.png  index = the synth manifest index; pass > 0 only on reuse
    OUT/merge.json                             run-level settings and counts (written first, then final)
    OUT/merge.jsonl                            one line per output image: where it came from, its seed

Every output image is a function of (source image, recipe, seed, its name), so a re-run with the same
arguments writes the same bytes. Files are written atomically; nothing is written outside OUT, and a
non-empty OUT is replaced only with `overwrite` and only when it holds a previous merge (merge.json).
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from augment_gan import __version__
from augment_gan.atomic import write_bytes_atomic
from augment_gan.errors import UserError
from augment_gan.guard import output_lock
from augment_gan.outputs import check_out_folder, class_folder, clear_outputs, inside, read_json, write_json

_log = logging.getLogger(__name__)

SETTINGS = "merge.json"
LOG = "merge.jsonl"
_OUTPUT_NAME = re.compile(r"^(real|synth)-\d{6,}-\d+\.png$")
_REAL, _SYNTHETIC = 0, 1


def _merge_owned(rel: str) -> bool:
    """A file name merge writes: what `overwrite` may delete; anything else the user put there stays."""
    folder, _, name = rel.rpartition("/")
    return bool(_OUTPUT_NAME.match(name)) or (not folder and name in (SETTINGS, LOG))


def _seed(seed: int, kind: int, index: int, copy: int) -> int:
    """Augmentation seed of one output image: independent of the order images are processed in."""
    return int(np.random.SeedSequence([seed, kind, index, copy]).generate_state(1)[0])


def _png(pixels: np.ndarray) -> bytes:
    """uint8 H×W×C (C = 1 or 3) -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _synthetic_plan(synth_set: Any, real_per_group: dict[str | None, int], ratio: float, seed: int
                    ) -> tuple[list[tuple[int, int, int, str, str | None]], int]:
    """The synthetic outputs: (plan entries as in `merge_folders`, their number).

    Per class, so the merged folder keeps the real class balance: each class gets ratio/(1-ratio)
    synthetic images per real output, from its own synthetic images (largest-remainder rounding makes the
    total exactly round(ratio/(1-ratio) × real outputs of the classes that have some).
    """
    plan = []
    groups: dict[str | None, list[int]] = {}
    for s, record in enumerate(synth_set.records):
        groups.setdefault(record["class"], []).append(s)
    names = [g for g in real_per_group if g in groups]
    want = np.array([ratio / (1 - ratio) * real_per_group[g] for g in names])
    n_synth_out = round(float(want.sum()))
    share = np.floor(want).astype(int)
    for g in np.argsort(-(want - share), kind="stable")[: n_synth_out - int(share.sum())]:
        share[g] += 1
    for g, count in zip(names, share):
        if count == 0:  # a small class of a long-tailed folder can round to none
            continue
        members = groups[g]
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SYNTHETIC, names.index(g)]))
        passes = -(-int(count) // len(members))
        stream = np.concatenate([rng.permutation(len(members)) for _ in range(passes)])[:count]
        if passes > 1:
            where = f"class {g}: " if g is not None else ""
            _log.warning(f"{where}{len(members)} synthetic images for {count} outputs; reusing some with different "
                         "augmentations")
        for j, m in enumerate(stream):
            s = members[m]
            record = synth_set.records[s]
            name = f"synth-{int(record['index']):06d}-{j // len(members)}.png"
            plan.append((_SYNTHETIC, s, j // len(members), f"{g}/{name}" if g else name, g))
    return plan, n_synth_out


def _balanced_plan(synth_set: Any, real_members: dict[str, list[int]], classes: list[str], copies: int,
                   seed: int) -> list[tuple[int, int, int, str, str | None]]:
    """The outputs that fill every class up to the largest one's real outputs (plan entries as in
    `merge_folders`): distinct synthetic images of the class first, then more copies of its real images.

    Real repeats go round the class's real images in a seeded order, so they are spread evenly; their copy
    numbers continue after `copies`, so each gets its own augmentation.
    """
    plan = []
    groups: dict[str, list[int]] = {}
    for s, record in enumerate(synth_set.records if synth_set is not None else []):
        groups.setdefault(record["class"], []).append(s)
    target = copies * max(len(members) for members in real_members.values())
    for cls, members in real_members.items():
        label = classes.index(cls)
        shortfall = target - copies * len(members)
        synthetic = groups.get(cls, [])
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SYNTHETIC, label]))
        for m in sorted(rng.permutation(len(synthetic))[:shortfall]):
            record = synth_set.records[synthetic[m]]
            plan.append((_SYNTHETIC, synthetic[m], 0, f"{cls}/synth-{int(record['index']):06d}-0.png", cls))
        repeats = shortfall - min(shortfall, len(synthetic))
        if repeats and synthetic:  # a class with none: SyntheticImageFolder has said so already
            _log.warning(f"class {cls}: {len(synthetic)} synthetic images for a shortfall of {shortfall}; "
                         f"writing {repeats} more augmented copies of its {len(members)} real images")
        order = np.random.default_rng(np.random.SeedSequence([seed, _REAL, label])).permutation(len(members))
        for j in range(repeats):
            i, copy = members[order[j % len(members)]], copies + j // len(members)
            plan.append((_REAL, i, copy, f"{cls}/real-{i:06d}-{copy}.png", cls))
    return plan


def merge_folders(real: str | os.PathLike, synthetic: str | os.PathLike | None, out: str | os.PathLike,
                  recipe: str | os.PathLike = "standard", *, copies: int = 1, seed: int = 0,
                  overwrite: bool = False, resolution: int | None = None, fit: str = "center-crop",
                  background: tuple[int, int, int] = (255, 255, 255), channels: str = "auto",
                  progress: bool = True, balance: bool = False) -> dict[str, Any]:
    """Write the merged, augmented ImageFolder to `out`; returns the summary also saved as merge.json.

    `resolution` defaults to the synthetic images' size (else `ReadOptions.resolution`, 32); real images are read with
    `augment_gan.data` (`fit`, `background`, `channels`) and synthetic ones follow the real set's
    channel count. The number of synthetic outputs is round(ratio / (1 - ratio) × real outputs), with
    ratio from the recipe's mix section, split over the classes like the real outputs; within a class,
    synthetic images are used without repeats first, and reused (with a different augmentation,
    pass > 0) only when the class has too few.

    `balance` (for long-tailed folders) replaces the recipe's ratio: every class ends with `copies` × n_max
    images, n_max being the largest class's real image count. A class's own real outputs come first, then
    distinct synthetic images of that class fill the shortfall, and only if those run out (or there are
    none) further augmented copies of its real images (copy numbers from `copies` on). It needs class
    folders; an unlabeled real folder is a UserError.

    A merge that was interrupted is finished by the same call; a second merge into `out` while one runs
    is refused.
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise UserError(f"copies must be a positive integer, got {copies!r}")
    real_root, out = Path(real).expanduser().resolve(), Path(out).expanduser().resolve()
    synth_root = Path(synthetic).expanduser().resolve() if synthetic is not None else None
    for name, source in (("--real", real_root), ("--synthetic", synth_root)):
        if source is not None and (inside(out, source) or inside(source, out)):
            raise UserError(f"--out {out} and {name} {source} must not contain each other")
    # A second merge into this folder would write the same files and remove each other's temporaries.
    with output_lock(out, "merge"):
        return _merge_locked(real_root, synth_root, out, recipe, copies, seed, overwrite, resolution, fit,
                             background, channels, progress, balance)


def _identity(settings: dict[str, Any]) -> str:
    """What makes two merges the same output (merge.json without its dates, counts and state), as JSON."""
    keys = ("real", "synthetic", "recipe", "recipe_definition", "seed", "copies", "synthetic_ratio",
            "read_options", "channels", "classes", "balance")
    return json.dumps({k: settings.get(k) for k in keys}, sort_keys=True)


def _merge_locked(real_root: Path, synth_root: Path | None, out: Path, recipe: str | os.PathLike, copies: int,
                  seed: int, overwrite: bool, resolution: int | None, fit: str, background: tuple[int, int, int],
                  channels: str, progress: bool, balance: bool) -> dict[str, Any]:
    """The rest of `merge_folders`, holding the output folder's lock."""
    from tqdm import tqdm

    from augment_gan.data import RESOLUTIONS, ReadOptions, load_folder, read_image, scan_folder
    from augment_gan.datasets import SyntheticImageFolder
    from augment_gan.recipes import load_recipe

    # A merge that was interrupted (merge.json says complete: false) is finished by the same command, keeping
    # the files it wrote (each is written atomically and is a function of its name); a finished one is
    # replaced only with `overwrite`.
    old = read_json(out / SETTINGS)
    resume = not overwrite and old is not None and old.get("complete") is False
    clear = False
    if not resume:
        _, clear = check_out_folder(out, SETTINGS, overwrite=overwrite)

    real_recipe = load_recipe(recipe, part="real")
    synth_recipe = load_recipe(recipe, part="synthetic")
    if synth_root is not None and not real_recipe.use_synthetic:
        _log.warning(f"recipe {real_recipe.name} does not use synthetic images (mix.use_synthetic: false); "
                     "ignoring --synthetic")
        synth_root = None

    # Check the classes before decoding anything: a mismatch is the synthetic dataset's clear error.
    scan = scan_folder(real_root)
    labeled = scan.layout == "classes"
    if balance and not labeled:
        raise UserError(f"--balance evens out classes, but {real_root} has no class folders")
    synth_set = None
    if synth_root is not None:
        with warnings.catch_warnings(record=True) as caught:  # logged like the rest, one line each
            warnings.simplefilter("always")
            synth_set = SyntheticImageFolder(synth_root, loader=lambda p: p,
                                             class_to_idx={c: i for i, c in enumerate(scan.classes)} if labeled else None)
        for warning in caught:
            _log.warning(str(warning.message))
        if synth_set.classes and not labeled:
            raise UserError(f"{real_root} has no class folders but the synthetic set has classes; "
                            "merge a labeled real folder, or unconditional synthetic images")
        if len(synth_set) == 0:
            raise UserError(f"{synth_root} has no kept synthetic images")
        if resolution is None:
            with Image.open(synth_set.samples[0][0]) as first:  # header only
                size = first.size
            if size[0] != size[1] or size[0] not in RESOLUTIONS:
                raise UserError(f"the synthetic images are {size[0]}×{size[1]}; pass --resolution "
                                f"({', '.join(map(str, RESOLUTIONS))})")
            resolution = size[0]
    options = ReadOptions(resolution=resolution or ReadOptions.resolution, fit=fit, background=background,
                          channels=channels)
    real_set = load_folder(real_root, options, progress=progress)
    labeled = real_set.labels is not None
    # Synthetic images follow the real set's channel count (a generator trained on it has the same).
    synth_options = ReadOptions(resolution=options.resolution, fit=fit, background=background,
                                channels="gray" if real_set.channels == 1 else "rgb")

    ratio = real_recipe.ratio if synth_set is not None and not balance else 0.0

    # Plan every output before writing anything: (kind, source index, copy/pass, relative name, class).
    plan: list[tuple[int, int, int, str, str | None]] = []
    real_per_group: dict[str | None, int] = {}
    for i in range(len(real_set)):
        cls = real_set.classes[real_set.labels[i]] if labeled else None
        real_per_group[cls] = real_per_group.get(cls, 0) + copies
        for k in range(copies):
            name = f"real-{i:06d}-{k}.png"
            plan.append((_REAL, i, k, f"{cls}/{name}" if cls else name, cls))
    if balance:
        real_members: dict[str, list[int]] = {}
        for i in range(len(real_set)):
            real_members.setdefault(real_set.classes[real_set.labels[i]], []).append(i)
        plan += _balanced_plan(synth_set, real_members, list(real_set.classes), copies, seed)
    elif ratio:
        plan += _synthetic_plan(synth_set, real_per_group, ratio, seed)[0]
    n_real_out = sum(1 for kind, *_ in plan if kind == _REAL)
    n_synth_out = len(plan) - n_real_out

    if clear:
        clear_outputs(out, _merge_owned)
    out.mkdir(parents=True, exist_ok=True)
    for cls in sorted({cls for *_, cls in plan if cls is not None}):
        class_folder(out, cls)
    summary: dict[str, Any] = {
        "augment_gan_version": __version__, "complete": False,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "real": str(real_root), "synthetic": str(synth_root) if synth_root else None,
        "recipe": real_recipe.name, "recipe_definition": real_recipe.to_dict(),
        "seed": seed, "copies": copies, "synthetic_ratio": None if balance else ratio, "balance": balance,
        "read_options": options.to_dict(), "channels": real_set.channels,
        "classes": list(real_set.classes),
    }
    if resume and _identity(old) != _identity(summary):
        raise UserError(f"{out} holds an unfinished merge made with other settings; pass --overwrite to replace "
                        "it or choose another --out")
    for folder in [out, *(out / cls for cls in sorted({cls for *_, cls in plan if cls is not None}))]:
        for tmp in folder.glob("*.tmp-*"):
            tmp.unlink(missing_ok=True)  # left by a killed merge (we hold the folder's lock)
    write_json(out / SETTINGS, summary)

    lines = []
    counts: dict[str, dict[str, int]] = {}
    for kind, index, copy, rel, cls in tqdm(plan, desc="merge", unit="img", disable=not progress, file=sys.stderr):
        target = out / rel
        aug_seed = _seed(seed, kind, index, copy)
        if kind == _REAL:
            origin = real_set.files[index]
        else:
            origin = synth_set.records[index]["file"]
        if not (resume and target.is_file()):  # a resumed merge keeps the files it finished
            if kind == _REAL:
                pixels, recipe_part = np.array(real_set.images[index]), real_recipe
            else:
                pixels, recipe_part = read_image(synth_set.samples[index][0], synth_options), synth_recipe
            recipe_part.reseed(aug_seed)
            write_bytes_atomic(target, _png(recipe_part.augment(pixels)), durable=False)  # many small files: no fsync
        source = "real" if kind == _REAL else "synthetic"
        lines.append(json.dumps({"file": rel, "source": source, "origin": origin, "class": cls,
                                 "copy": copy, "seed": aug_seed}))
        per = counts.setdefault(cls if cls is not None else "", {"real": 0, "synthetic": 0})
        per[source] += 1

    write_bytes_atomic(out / LOG, ("\n".join(lines) + "\n").encode() if lines else b"", durable=True)
    summary.update(complete=True, counts={
        "real_images": len(real_set), "real": n_real_out, "synthetic": n_synth_out,
        "synthetic_available": len(synth_set) if synth_set is not None else 0,
        "total": n_real_out + n_synth_out, "per_class": counts,
    })
    write_json(out / SETTINGS, summary)
    return summary
