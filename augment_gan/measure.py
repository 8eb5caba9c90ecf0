"""Measuring synthetic sets by training on them: per seed, one real-only classifier (and, for imbalanced
classes, one with class-balanced sampling) and one real+candidate classifier per candidate, all with that seed
(paired), each scored on the same held-out real images.

`augment` (`augment_gan.augment`) calls `measure`; the rule that reads the scores is `augment_gan.decision`.
Every score is appended to a JSONL file as soon as it exists, and `measure` skips the (candidate, seed) pairs
the file already holds, so an interrupted measurement keeps every classifier it finished. The classifier is
`augment_gan.classifier`'s small CNN with `evaluate --downstream`'s recipes (`downstream.downstream_recipes`).
Importing this module does not import torch.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from augment_gan.decision import REAL, REAL_BALANCED, scores
from augment_gan.errors import UserError

if TYPE_CHECKING:
    from augment_gan.augmentconfig import AugmentConfig
    from augment_gan.data import ReadOptions

_log = logging.getLogger("augment_gan.augment")  # part of `augment`

Arrays = tuple[np.ndarray, np.ndarray]
"""(uint8 N×H×W×C images, int64 N labels)."""


def read_options(run_dir: Path) -> ReadOptions:
    """How the classifiers read every image: the way the fit in `run_dir` read its training images."""
    from augment_gan.data import ReadOptions
    from augment_gan.runmeta import latest_meta

    meta = latest_meta(run_dir)
    if meta is None:
        raise UserError(f"{run_dir} holds no checkpoint; rerun with --overwrite to start again")
    return ReadOptions(resolution=meta.config.resolution, fit=meta.config.fit,
                       background=meta.config.background, channels="gray" if meta.channels == 1 else "rgb")


def load_labeled(folder: Path, options: ReadOptions, classes: list[str], cache_dir: Path, what: str) -> Arrays:
    """A folder of class subfolders (or a synth/vary set) as arrays, its labels indexing `classes` by name."""
    from augment_gan.data import load_folder
    from augment_gan.downstream import align_labels

    images = load_folder(folder, options, cache_dir=cache_dir, progress=False)
    return np.asarray(images.images), align_labels(classes, images, what)


def read_results(path: Path) -> list[dict[str, Any]]:
    """The scores measured so far; a line cut short by a killed process is dropped (and the file rewritten
    without it, so that the next append starts on a line of its own)."""
    if not path.is_file():
        return []
    text = path.read_text()
    rows, bad = [], False
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad = True
    if bad or (text and not text.endswith("\n")):
        from augment_gan.atomic import write_bytes_atomic

        write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return rows


def oversample_indices(labels: np.ndarray, target: list[int], seed: int) -> np.ndarray:
    """Indices into `labels` holding target[c] images of class c: all of them as often as fits, the remainder a
    random subset without replacement, so every image appears within one time of every other of its class."""
    rng = np.random.default_rng(seed)
    out = []
    for c, t in enumerate(target):
        idx = np.flatnonzero(labels == c)
        if t and not len(idx):
            raise UserError(f"class {c} has no training image to oversample")
        reps, rest = divmod(t, max(len(idx), 1))
        out += [np.tile(idx, reps), rng.choice(idx, rest, replace=False) if rest else idx[:0]]
    return np.concatenate(out)


def balanced(train: Arrays, seed: int) -> Arrays:
    """`train` with every class's images repeated up to the largest class's count (random oversampling,
    `oversample_indices`), for the `REAL_BALANCED` arm."""
    images, labels = train
    counts = np.bincount(labels)
    order = oversample_indices(labels, [int(counts.max()) if n else 0 for n in counts], seed)
    return images[order], labels[order]


def train_and_score(name: str, train: Arrays, val: Arrays, extra: Arrays | None, ratio: float, seed: int,
                    config: AugmentConfig, recipes: tuple[Any, Any, str], num_classes: int, device: str,
                    bar: Any) -> dict[str, Any]:
    """Classifier `name` (a candidate, or a real-only arm without `extra`) of seed `seed`, trained and scored on
    the held-out images (`decision.scores`)."""
    from augment_gan.classifier import predict, train_classifier

    bar.set_description(f"classifier {name}, seed {seed}")
    model = train_classifier(train[0], train[1], steps=config.steps, batch_size=config.batch_size, seed=seed,
                             recipe=recipes[0], extra=extra, synthetic_ratio=ratio, extra_recipe=recipes[1],
                             num_classes=num_classes, device=device, progress=lambda step, loss: bar.update())
    return scores(predict(model, val[0]), val[1], num_classes)


def measure(path: Path, train: Arrays, val: Arrays, sets: dict[str, Arrays], candidates: list[dict[str, Any]],
            seeds: list[int], num_classes: int, config: AugmentConfig, device: str, *,
            balance: bool = False) -> None:
    """Append to `path` the score of every (candidate, seed), (`REAL`, seed) and, with `balance`,
    (`REAL_BALANCED`, seed) it does not hold yet.

    `candidates`: {"name", "set" (a key of `sets`), "ratio"} each. Seed by seed, the real-only arms first, so an
    interruption leaves complete pairs behind.
    """
    from augment_gan.downstream import downstream_recipes, step_bar
    from augment_gan.evaluate import torch_threads

    real_arms = [{"name": REAL, "set": None, "ratio": 0.0}]
    pools = {REAL: train}
    if balance:
        real_arms.append({"name": REAL_BALANCED, "set": None, "ratio": 0.0})
        pools[REAL_BALANCED] = balanced(train, config.seed)
    done = {(r["candidate"], r["seed"]) for r in read_results(path)}
    jobs = [(c, seed) for seed in seeds for c in [*real_arms, *candidates] if (c["name"], seed) not in done]
    if done:
        _log.info(f"{len(done)} classifiers already measured; {len(jobs)} to go")
    recipes = downstream_recipes(config.recipe, config.seed)
    bar = step_bar(len(jobs) * config.steps, "classifiers", config.progress)
    with torch_threads(config.threads, device), open(path, "a") as log:
        for c, seed in jobs:
            extra = sets[c["set"]] if c["set"] is not None else None
            row = {"candidate": c["name"], "seed": seed,
                   **train_and_score(c["name"], pools.get(c["name"], train), val, extra, c["ratio"], seed, config,
                                     recipes, num_classes, device, bar)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            os.fsync(log.fileno())   # a score on disk is a classifier never trained again
            _log.info(f"seed {seed} {c['name']}: accuracy {row['accuracy']:.1%}, balanced accuracy "
                      f"{row['balanced_accuracy']:.1%}")
    bar.close()
