"""Measuring a synthetic set by training on it: downstream classifier accuracy (real-only vs real+synthetic,
paired per seed) and a linear probe of a trained discriminator's features.

Both train small classifiers on the labeled real folder and test them on held-out real images; `evaluate`
(`augment_gan.evaluate`) calls them for `--downstream` and `--probe`. The classifier is
`augment_gan.classifier`; importing this module does not import torch.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from augment_gan.errors import UserError

if TYPE_CHECKING:
    from augment_gan.evaluate import EvaluateConfig

_log = logging.getLogger("augment_gan.evaluate")  # both are part of `evaluate` (augment_gan.evaluate)


def step_bar(total: int, desc: str, progress: bool):
    """A tqdm bar on stderr over `total` optimizer steps (disabled when not `progress`)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not progress, leave=False,
                dynamic_ncols=True)


def _mean_std(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "runs": a.tolist()}


def align_labels(real_classes: list[str], other, what: str) -> np.ndarray:
    """Labels of `other` (an ImageSet) re-indexed into `real_classes` by class name."""
    if other.labels is None or not other.classes:
        raise UserError(f"the {what} folder has no class subfolders; downstream accuracy needs labels")
    index = {name: i for i, name in enumerate(real_classes)}
    unknown = [c for c in other.classes if c not in index]
    if unknown:
        raise UserError(f"{what} class(es) {', '.join(unknown[:5])} are not classes of the real folder "
                        f"({', '.join(real_classes[:10])})")
    remap = np.array([index[c] for c in other.classes], dtype=np.int64)
    return remap[np.asarray(other.labels)]


# ----------------------------------------------------------------------------------------------------
# Downstream accuracy.


def downstream_recipes(name: str, seed: int) -> tuple[Any, Any, str]:
    """(real part, synthetic part, name) of the downstream recipe, built in full (albumentations)."""
    if name == "none":
        return None, None, "none"
    from augment_gan.recipes import load_recipe

    real = load_recipe(name, part="real", seed=seed)
    synth = load_recipe(name, part="synthetic", seed=seed)
    return real, synth, real.name


def downstream(real_set, synth_set, config: EvaluateConfig, *, cache_dir=None,
               log: Callable[[str], None] = _log.info, progress: bool = False,
               recipes: tuple[Any, Any, str] | None = None) -> dict[str, Any]:
    """Train the small CNN on real-only and on real+synthetic (same steps, same recipe) for several seeds,
    test both on held-out real images, and report accuracy with spread and the paired gain.

    `recipes`: the (real, synthetic, name) `check_inputs` built; loaded here when None."""
    from augment_gan.classifier import accuracy, stratified_split, train_classifier

    if real_set.labels is None or len(real_set.classes) < 2:
        raise UserError("--downstream needs a real folder with at least two class subfolders")
    classes = real_set.classes
    synth_labels = align_labels(classes, synth_set, "synthetic")
    synth_images = np.asarray(synth_set.images)
    real_images, real_labels = np.asarray(real_set.images), np.asarray(real_set.labels)

    test_images = test_labels = None
    if config.test_dir:
        from augment_gan.data import ReadOptions, load_folder

        channels = "gray" if real_set.channels == 1 else "rgb"
        test_set = load_folder(config.test_dir, ReadOptions(resolution=real_images.shape[1], channels=channels),
                               cache_dir=cache_dir, progress=False)
        test_images, test_labels = np.asarray(test_set.images), align_labels(classes, test_set, "test")
        test_note = f"--test {test_set.root} ({len(test_set)} images)"
    else:
        test_note = (f"{config.test_fraction:.0%} of --real held out per seed (stratified); if the GAN was "
                     "trained on all of --real it has seen these images, so the gain may be optimistic")

    real_recipe, synth_recipe, recipe_name = recipes or downstream_recipes(config.recipe, config.seed)
    ratio = config.synthetic_ratio
    if ratio is None:
        ratio = real_recipe.ratio if real_recipe is not None and real_recipe.ratio > 0 else 0.5

    real_only, mixed = [], []
    n_train = n_test = 0
    bar = step_bar(2 * config.seeds * config.steps, "downstream classifiers", progress)
    for s in range(config.seeds):
        seed = config.seed + s
        if test_images is None:
            tr, te = stratified_split(real_labels, config.test_fraction, seed)
            x_tr, y_tr, x_te, y_te = real_images[tr], real_labels[tr], real_images[te], real_labels[te]
        else:
            x_tr, y_tr, x_te, y_te = real_images, real_labels, test_images, test_labels
        n_train, n_test = len(x_tr), len(x_te)
        common = dict(steps=config.steps, batch_size=config.batch_size, seed=seed, recipe=real_recipe,
                      num_classes=len(classes), device=config.device, progress=lambda step, loss: bar.update())
        a = accuracy(train_classifier(x_tr, y_tr, **common), x_te, y_te)
        b = accuracy(train_classifier(x_tr, y_tr, extra=(synth_images, synth_labels), synthetic_ratio=ratio,
                                      extra_recipe=synth_recipe, **common), x_te, y_te)
        real_only.append(a)
        mixed.append(b)
        log(f"downstream seed {seed}: real-only {a:.1%}, real+synthetic {b:.1%}")
    bar.close()
    return {
        "test": test_note, "recipe": recipe_name, "synthetic_ratio": ratio, "steps": config.steps,
        "batch_size": config.batch_size, "seeds": config.seeds, "n_train": n_train, "n_test": n_test,
        "n_synthetic": len(synth_images),
        "real_only": _mean_std(real_only), "real_plus_synthetic": _mean_std(mixed),
        "gain": _mean_std([b - a for a, b in zip(real_only, mixed)]),
    }


# ----------------------------------------------------------------------------------------------------
# Discriminator probe.


def probe(run: str | Path, real_dir: str | Path, config: EvaluateConfig, *, cache_dir=None,
          log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Linear-probe accuracy of a trained discriminator's `D.features` on the labeled real folder, split by
    `config.test_fraction`, next to a randomly initialised D (`probe_discriminator`)."""
    from augment_gan.checkpoint import load_checkpoint
    from augment_gan.classifier import stratified_split
    from augment_gan.data import ReadOptions, load_folder

    ckpt = load_checkpoint(run)
    data = load_folder(real_dir, ReadOptions.from_checkpoint(ckpt), cache_dir=cache_dir, progress=False)
    if data.labels is None or len(data.classes) < 2:
        raise UserError("--probe needs a real folder with at least two class subfolders")
    images, labels = np.asarray(data.images), np.asarray(data.labels)
    tr, te = stratified_split(labels, config.test_fraction, config.seed)
    result = {"checkpoint": str(ckpt.path), "digest": ckpt.digest, "classes": len(data.classes)}
    return {**result, **probe_discriminator(ckpt, (images[tr], labels[tr]), (images[te], labels[te]),
                                            steps=config.probe_steps, seed=config.seed, device=config.device, log=log)}


def probe_discriminator(ckpt: Any, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *,
                        steps: int = 300, seed: int = 0, device: str = "cpu",
                        log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Linear-probe test accuracy on `D.features` of the checkpoint's trained D, next to the same probe on a
    randomly initialised D of the same architecture: the D the run started from (its config and seed, built as
    `fit` builds it), so the difference is what training taught D. `train`/`test`: (uint8 N×H×W×C, labels)."""
    import torch

    from augment_gan.features import discriminator_extractor
    from augment_gan.metrics import linear_probe
    from augment_gan.models import build_networks

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ckpt.config.seed)  # as train._build: G, D, E from the run's seed
        _, random_d, _ = build_networks(ckpt.config, ckpt.channels, ckpt.num_classes)
    result: dict[str, Any] = {"n_train": len(train[0]), "n_test": len(test[0]), "random_d_seed": ckpt.config.seed}
    for name, D in (("trained_d", ckpt.D), ("random_d", random_d)):
        extract = discriminator_extractor(D, name=name, device=device)
        f_tr, f_te = extract(train[0]), extract(test[0])
        result[name] = linear_probe(f_tr, train[1], f_te, test[1], steps=steps, seed=seed)
        log(f"probe {name.replace('_', ' ')}: {result[name]:.1%}")
    result["feature_dim"] = int(f_tr.shape[1])
    result["gain"] = result["trained_d"] - result["random_d"]
    return result
