"""Evaluating a synthetic image set against the real one: distribution metrics in a named feature space,
memorisation, downstream classifier accuracy (real-only vs real+synthetic) and a discriminator probe.

`evaluate(real, synthetic, config)` returns one JSON-ready dict; `format_result` renders it as the table
the CLI prints. Metric formulas live in `augment_gan.metrics`; the downstream accuracy and the probe, which
train classifiers, in `augment_gan.downstream`.
Everything that can be checked without reading an image (folders, recipe, weights file, probe run) is
checked first; progress text goes to the `augment_gan` logger, training progress to tqdm bars on stderr.
Importing this module does not import torch, so a bad option fails in a fraction of a second.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from augment_gan.atomic import write_bytes_atomic
from augment_gan.data import RESOLUTIONS
from augment_gan.downstream import align_labels, downstream, downstream_recipes, probe, step_bar
from augment_gan.errors import UserError
from augment_gan.outputs import check_room, removed_on_failure
from augment_gan.validation import check_types

_log = logging.getLogger(__name__)

FEATURE_KINDS = ("auto", "classifier", "random", "inception", "pixels")


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of `augment-gan evaluate`; stored in its JSON output so a result can be reproduced."""

    features: str = "auto"
    """auto (classifier when the real folder is labeled, else random), classifier, random, inception,
    pixels (16×16 area-downsampled images, synth --dedup's space), or a path to FID Inception weights
    (same as inception + `inception_weights`)."""
    inception_weights: str | None = None
    """torch-fidelity's FID Inception-v3 weights file (`--features inception`); nothing is downloaded."""
    resolution: int | None = None
    """Side length both folders are read at; None: 32 when the synthetic images are at most 32 px, else 64."""
    feature_steps: int = 400
    """Optimizer steps of the classifier whose features `auto`/`classifier` use (400 × 64 images: ~90%
    test accuracy on 200 MNIST digits; more steps change the features, so keep it fixed when comparing)."""
    k: int = 5
    """Neighbours that define the manifolds of precision/recall and density/coverage (Naeem et al. 2020 use 5)."""
    max_samples: int = 5000
    """Images per set the k-NN metrics use at most (a random subset above it; their cost grows as N²)."""
    kid_subsets: int = 100
    """Random subsets KID averages over (its ± is their spread)."""
    pairs: int = 16
    """Synthetic/real nearest-neighbour pairs drawn in pairs.png (closest first)."""

    downstream: bool = False
    """Also train the small CNN on real-only and real+synthetic images and compare held-out accuracy."""
    seeds: int = 3
    """Downstream runs per arm (each its own split, initialisation and batches); the gain is paired per seed."""
    steps: int = 300
    """Classifier optimizer steps per downstream run (same for real-only and real+synthetic). 300 × 64 images:
    on the bundled digits (350 training images) real-only accuracy over seeds 0-2 was 94.7% at 200 steps,
    95.3% at 300 and 95.1% at 500, so the default keeps `--downstream` there at about a minute of CPU time;
    give larger folders more (`--steps`)."""
    batch_size: int = 64
    """Batch size of the downstream classifiers (the feature classifier keeps 64, so features stay comparable)."""
    recipe: str = "standard"
    """Augmentation recipe for downstream training (`none` for no augmentation)."""
    synthetic_ratio: float | None = None
    """Share of synthetic images per batch; None: the recipe's ratio (standard: 0.25), or 0.5 without one."""
    test_fraction: float = 0.3
    """Share of each class of the real folder held out for testing when there is no `test_dir`."""
    test_dir: str | None = None
    """A separate held-out real folder; without it, `test_fraction` of the real folder is held out."""

    probe: str | None = None
    """Run directory or checkpoint whose discriminator features get a linear probe."""
    probe_steps: int = 300
    """Optimizer steps of each linear probe."""

    seed: int = 0
    """Seeds the classifiers, the held-out splits and the metrics' random subsets."""
    device: str = "cpu"
    """cpu, cuda, cuda:N, mps, or auto (resolved when the evaluation starts)."""
    threads: int | None = None
    """torch threads while evaluating; None: 1 on the CPU. The small CNN's layers are too small for
    intra-op threads to pay, and a second core is better spent augmenting the next batch
    (`classifier.train_classifier`): on the 2-core dev machine, with other jobs running, a 32 px step with
    the standard recipe took 32 ms (median of 3 × 200 steps) with one thread and 44 ms with two."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.features not in FEATURE_KINDS and not Path(self.features).expanduser().is_file():
            raise UserError(f"--features must be one of {', '.join(FEATURE_KINDS)} or an existing weights "
                            f"file, got {self.features!r}")
        if self.features == "inception" and not self.inception_weights:
            raise UserError("--features inception needs --inception-weights PATH (nothing is downloaded)")
        if self.resolution is not None and self.resolution not in RESOLUTIONS:
            raise UserError(f"--resolution must be one of {', '.join(map(str, RESOLUTIONS))}, got {self.resolution}")
        for name in ("feature_steps", "seeds", "steps", "probe_steps", "k", "max_samples", "kid_subsets"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise UserError(f"batch size must be at least 2, got {self.batch_size}")
        if self.synthetic_ratio is not None and not 0 < self.synthetic_ratio < 1:
            raise UserError(f"synthetic ratio must be in (0, 1), got {self.synthetic_ratio}")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"test fraction must be in (0, 1), got {self.test_fraction}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be at least 1, got {self.threads}")
        if self.inception_weights is not None and not Path(self.inception_weights).expanduser().is_file():
            raise UserError(f"--inception-weights: file not found: {self.inception_weights}")
        if self.recipe != "none":
            from augment_gan.recipes import check_recipe

            check_recipe(self.recipe)  # name or file, and its YAML; the pipelines are built before any work



@contextlib.contextmanager
def torch_threads(threads: int | None, device: str) -> Iterator[None]:
    """Run the block with `threads` torch threads (None: 1 on the CPU, torch's own elsewhere); restore after."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if device == "cpu" else saved))
    try:
        yield
    finally:
        torch.set_num_threads(saved)



# ----------------------------------------------------------------------------------------------------
# Reading the folders.


def default_resolution(synthetic: str | Path) -> int:
    """32 when the synthetic images are at most 32 px on their long side, else 64 (bounded CPU cost)."""
    from PIL import Image

    from augment_gan.data import scan_folder

    scan = scan_folder(synthetic)
    if not scan.files:
        raise UserError(f"no images in {scan.root}")
    try:
        with Image.open(scan.root / scan.files[0]) as im:
            side = max(im.size)
    except OSError:
        return 64
    return 32 if side <= 32 else 64


def _drop_rejected(images, root: Path):
    """Remove images that a `synth` manifest marks `kept: false` (filtered samples left on disk)."""
    from augment_gan.manifest import MANIFEST, read_manifest

    manifest = root / MANIFEST
    if not manifest.is_file():
        return images
    rejected = {row.file for row in read_manifest(manifest) if row.kept is False and row.file is not None}
    if not rejected:
        return images
    keep = np.array([f not in rejected for f in images.files])
    images.images = np.asarray(images.images)[keep]
    images.labels = images.labels[keep] if images.labels is not None else None
    images.files = [f for f, k in zip(images.files, keep) if k]
    return images


def read_pair(real: str | Path, synthetic: str | Path, resolution: int, *, cache_dir=None, progress=True):
    """Read both folders at `resolution` with the same channel count (the real folder decides)."""
    from augment_gan.data import ReadOptions, load_folder

    real_set = load_folder(real, ReadOptions(resolution=resolution), cache_dir=cache_dir, progress=progress)
    channels = "gray" if real_set.channels == 1 else "rgb"
    synth_set = load_folder(synthetic, ReadOptions(resolution=resolution, channels=channels),
                            cache_dir=cache_dir, progress=progress)
    return real_set, _drop_rejected(synth_set, synth_set.root)



# ----------------------------------------------------------------------------------------------------
# Features.


def build_extractor(config: EvaluateConfig, real_set, log: Callable[[str], None] = _log.info, *,
                    progress: bool = False):
    """The feature extractor `config.features` names, built offline (never downloads anything)."""
    from augment_gan import features

    kind = config.features
    if kind not in FEATURE_KINDS:  # a weights file
        return features.inception_extractor(kind, device=config.device)
    if kind == "inception":
        return features.inception_extractor(config.inception_weights, device=config.device)
    if kind == "pixels":
        return features.pixel_extractor(channels=real_set.channels, device=config.device)
    labeled = real_set.labels is not None and len(real_set.classes) >= 2
    if kind == "classifier" and not labeled:
        raise UserError("--features classifier needs a real folder with at least two class subfolders")
    if kind == "classifier" or (kind == "auto" and labeled):
        log(f"training the feature classifier on {len(real_set)} real images ({config.feature_steps} steps)")
        with step_bar(config.feature_steps, "feature classifier", progress) as bar:
            return features.classifier_extractor(np.asarray(real_set.images), real_set.labels,
                                                steps=config.feature_steps, seed=config.seed, device=config.device,
                                                progress=lambda step, loss: bar.update())
    return features.random_extractor(real_set.channels, seed=config.seed, device=config.device)


def normalise_features(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre both sets on the real mean and scale by one number so real features have mean variance 1.

    Our extractors have arbitrary scale, which KID's polynomial kernel is sensitive to; one global scale
    keeps distances' geometry (k-NN metrics are unchanged) and makes FD read in units of the real set's
    own spread. Inception features are left raw, as published FID/KID use them.
    """
    mean = real.mean(axis=0, keepdims=True)
    scale = float(np.sqrt(((real - mean) ** 2).mean())) or 1.0
    return (real - mean) / scale, (fake - mean) / scale


# ----------------------------------------------------------------------------------------------------
# Pairs image.


def pairs_png(synthetic: np.ndarray, real: np.ndarray, memo, n: int) -> tuple[bytes, list[int]]:
    """PNG of the `n` synthetic images closest to a real one: columns of (synthetic above its nearest real)."""
    from PIL import Image

    from augment_gan.grid import tile

    order = np.argsort(memo.distance, kind="stable")[:n]
    tiles = np.concatenate([synthetic[order], real[memo.nearest[order]]])  # row 1 synthetic, row 2 real
    array = tile(tiles, ncols=len(order))
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue(), order.tolist()


# ----------------------------------------------------------------------------------------------------
# The whole evaluation.


@dataclass(frozen=True)
class Evaluation:
    """What `compute` returns: the JSON-ready result and the closest-pairs PNG."""

    result: dict[str, Any]
    pairs_png: bytes


def check_inputs(real: str | Path, synthetic: str | Path, config: EvaluateConfig) -> tuple[Any, Any, str] | None:
    """Fail before any image is read: the folders, the probe's run, the Inception dependencies, and the
    downstream recipe built in full. Returns the recipe's parts for `downstream` (None without it)."""
    for what, folder in (("--real", real), ("--synthetic", synthetic), ("--test", config.test_dir)):
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise UserError(f"{what} folder not found: {folder}")
    if config.probe:
        from augment_gan.checkpoint import resolve_checkpoint

        resolve_checkpoint(config.probe)
    if config.features == "inception" or config.features not in FEATURE_KINDS:
        from augment_gan.features import require_inception

        require_inception()
    return downstream_recipes(config.recipe, config.seed) if config.downstream else None


def compute(real: str | Path, synthetic: str | Path, config: EvaluateConfig = EvaluateConfig(), *,
            cache_dir=None, progress: bool = True, log: Callable[[str], None] = _log.info) -> Evaluation:
    """Compare a synthetic folder with a real one (writes nothing but the dataset cache); see `evaluate`."""
    from augment_gan.device import resolve_device

    recipes = check_inputs(real, synthetic, config)
    config = dataclasses.replace(config, device=str(resolve_device(config.device)))  # "auto" -> the device used
    _log.debug(f"evaluating on {config.device}, torch threads: "
               f"{config.threads or (1 if config.device == 'cpu' else 'torch default')}")
    with torch_threads(config.threads, config.device):
        return _compute(real, synthetic, config, recipes, cache_dir=cache_dir, progress=progress, log=log)


def _compute(real: str | Path, synthetic: str | Path, config: EvaluateConfig, recipes: tuple[Any, Any, str] | None,
             *, cache_dir, progress: bool, log: Callable[[str], None]) -> Evaluation:
    from augment_gan import metrics

    # Read both folders.
    resolution = config.resolution or default_resolution(synthetic)
    real_set, synth_set = read_pair(real, synthetic, resolution, cache_dir=cache_dir, progress=progress)
    if len(synth_set) < 2 or len(real_set) < 2:
        raise UserError("both folders need at least 2 images")
    real_images, synth_images = np.asarray(real_set.images), np.asarray(synth_set.images)
    log(f"read {len(real_set)} real and {len(synth_set)} synthetic images at {resolution}px")
    labeled = real_set.labels is not None and len(real_set.classes) >= 2
    if (config.downstream or config.probe) and not labeled:
        raise UserError(f"--{'downstream' if config.downstream else 'probe'} needs a real folder with at "
                        "least two class subfolders")
    if config.downstream:
        align_labels(real_set.classes, synth_set, "synthetic")  # fail before the slow part

    # Features.
    extractor = build_extractor(config, real_set, log, progress=progress)
    log(f"features: {extractor.name}")
    f_real, f_synth = extractor(real_images, progress=progress), extractor(synth_images, progress=progress)
    normalised = not extractor.name.startswith("inception")
    if normalised:
        f_real, f_synth = normalise_features(f_real, f_synth)

    # Distribution metrics. The FD between two random halves of the real set is the floor a perfect
    # generator would reach at that sample size, which gives a non-standard feature space a scale.
    fd = metrics.frechet_distance(f_real, f_synth)
    half = np.random.default_rng(config.seed).permutation(len(f_real))
    fd_real_halves = (metrics.frechet_distance(f_real[half[: len(half) // 2]], f_real[half[len(half) // 2:]])
                      if len(f_real) >= 4 else None)
    kid_size = metrics.kid_subset_size(len(f_real), len(f_synth))
    kid_mean, kid_std = metrics.kernel_distance(f_real, f_synth, subset_size=kid_size,
                                                subsets=config.kid_subsets, seed=config.seed)
    manifold = metrics.precision_recall_density_coverage(f_real, f_synth, k=config.k,
                                                         max_samples=config.max_samples, seed=config.seed)
    memo = metrics.memorisation(f_real, f_synth)
    png, order = pairs_png(synth_images, real_images, memo, config.pairs)

    result: dict[str, Any] = {
        "real": {"path": str(real_set.root), "images": len(real_set), "classes": real_set.classes,
                 "channels": real_set.channels},
        "synthetic": {"path": str(synth_set.root), "images": len(synth_set), "classes": synth_set.classes},
        "resolution": resolution,
        "features": {"name": extractor.name, "dim": int(f_real.shape[1]),
                     "normalised": "centred and scaled by the real set" if normalised else None},
        "fd": fd,
        "fd_real_halves": fd_real_halves,
        "kid": {"mean": kid_mean, "std": kid_std, "subset_size": kid_size, "subsets": config.kid_subsets},
        **manifold,
        "k": config.k,
        "memorisation": {
            "share": memo.share, "flagged": int(memo.flagged.sum()), "threshold": memo.threshold,
            "percentile": memo.percentile, "pairs_png": None,
            "closest": [{"synthetic": synth_set.files[i], "real": real_set.files[int(memo.nearest[i])],
                         "distance": float(memo.distance[i]), "flagged": bool(memo.flagged[i])} for i in order]},
        "downstream": None,
        "probe": None,
        "config": asdict(config),
    }
    if config.downstream:
        result["downstream"] = downstream(real_set, synth_set, config, cache_dir=cache_dir, log=log,
                                          progress=progress, recipes=recipes)
    if config.probe:
        result["probe"] = probe(config.probe, real, config, cache_dir=cache_dir, log=log)
    return Evaluation(result, png)


def evaluate(real: str | Path, synthetic: str | Path, config: EvaluateConfig = EvaluateConfig(), *,
             out_dir: str | Path | None = None, overwrite: bool = False, cache_dir=None,
             progress: bool = True, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Compare a synthetic folder with a real one; returns a JSON-ready dict (see `format_result`).

    With `out_dir`, also writes `metrics.json` and `pairs.png` (the closest synthetic/real pairs:
    synthetic images on the top row, their nearest real images below) there, atomically, refusing to
    replace existing files unless `overwrite`. A failed evaluation leaves no new `out_dir` behind.
    """
    if out_dir is None:
        return compute(real, synthetic, config, cache_dir=cache_dir, progress=progress, log=log).result
    out_dir = Path(out_dir)
    targets = [out_dir / "metrics.json", out_dir / "pairs.png"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite to replace it")
    with removed_on_failure(out_dir):
        check_room(out_dir)  # a read-only --out fails now, not after the evaluation
        evaluation = compute(real, synthetic, config, cache_dir=cache_dir, progress=progress, log=log)
        result = evaluation.result
        write_bytes_atomic(targets[1], evaluation.pairs_png)
        result["memorisation"]["pairs_png"] = str(targets[1])
        write_bytes_atomic(targets[0], (json.dumps(result, indent=2) + "\n").encode())
    return result


# ----------------------------------------------------------------------------------------------------
# Text output.


def _pct(stats: dict[str, Any]) -> str:
    return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}%"


def format_result(result: dict[str, Any]) -> str:
    """The human-readable table `augment-gan evaluate` prints."""
    r = result
    lines = [
        f"real       {r['real']['path']} ({r['real']['images']} images)",
        f"synthetic  {r['synthetic']['path']} ({r['synthetic']['images']} images)",
        f"features   {r['features']['name']}, {r['features']['dim']}-d at {r['resolution']}px"
        + ("" if r["features"]["normalised"] is None else " (not comparable with published FID)"),
        "",
        f"{'metric':<28}{'value':>12}   meaning",
        f"{'Fréchet distance':<28}{r['fd']:>12.3f}   lower is closer"
        + ("" if r["fd_real_halves"] is None else f"; real vs real halves: {r['fd_real_halves']:.3f}"),
        f"{'KID':<28}{r['kid']['mean']:>12.4f}   ± {r['kid']['std']:.4f} (subsets of {r['kid']['subset_size']})",
        f"{'precision':<28}{r['precision']:>12.3f}   share of synthetic inside the real manifold (k={r['k']})",
        f"{'recall':<28}{r['recall']:>12.3f}   share of real inside the synthetic manifold",
        f"{'density':<28}{r['density']:>12.3f}   ≈1 when the sets match",
        f"{'coverage':<28}{r['coverage']:>12.3f}   share of real neighbourhoods with a synthetic image",
        f"{'memorised':<28}{r['memorisation']['share']:>12.1%}   closer to a real image than "
        f"{100 - r['memorisation']['percentile']:.0f}% of real pairs ({r['memorisation']['flagged']} images)",
    ]
    if r["memorisation"]["pairs_png"]:
        lines.append(f"{'':<43}closest pairs: {r['memorisation']['pairs_png']}")
    d = r.get("downstream")
    if d:
        lines += ["", f"downstream: small CNN, {d['steps']} steps, recipe {d['recipe']}, synthetic ratio "
                      f"{d['synthetic_ratio']:g}, {d['seeds']} seeds, {d['n_train']} train / {d['n_test']} test images",
                  f"  test: {d['test']}",
                  f"{'  real only':<28}{_pct(d['real_only']):>16}",
                  f"{'  real + synthetic':<28}{_pct(d['real_plus_synthetic']):>16}",
                  f"{'  gain':<28}{100 * d['gain']['mean']:>+13.1f} pp ± {100 * d['gain']['std']:.1f}"]
    p = r.get("probe")
    if p:
        lines += ["", f"probe: linear classifier on D.features ({p['feature_dim']}-d), "
                      f"{p['n_train']} train / {p['n_test']} test images, {p['classes']} classes",
                  f"{'  trained D':<28}{p['trained_d']:>12.1%}",
                  f"{'  random-init D':<28}{p['random_d']:>12.1%}   same architecture, the run's initial weights",
                  f"{'  trained - random':<28}{100 * (p['trained_d'] - p['random_d']):>+10.1f} pp"]
    return "\n".join(lines)
