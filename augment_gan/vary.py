"""Variations of real images: encode with the latent encoder E, perturb the latent, decode with G_ema.

Variation k of a source image is G(mu + sigma·eps_k), where (mu, logvar) = E(image) and eps_k ~ N(0, I)
comes from `sample.latents(derive_seed(seed, source path), [k])`. sigma is in z-space units — the
prior's standard deviation — rather than a multiple of E's posterior std exp(logvar/2): E is trained with a
small KL weight, so its posterior is narrow and uneven across images, while G was trained on z ~ N(0, I),
so sigma means the same distance for every image and every checkpoint (0 reconstructs, 1 is as far as a
fresh sample's spread). The manifest records mu's posterior std anyway, for those who want to compare.

A labeled source folder (ImageFolder layout) keeps its classes: DIR/<class>/<stem>_<k>.png; a conditional
checkpoint also gets the class as G's label, so labeled data grows even without a conditional model.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from augment_gan import __version__
from augment_gan.device import pick_device
from augment_gan.errors import UserError
from augment_gan.guard import output_lock
from augment_gan.imagefile import ImageWriter, default_workers, readable_image
from augment_gan.manifest import MANIFEST, ManifestRow, read_manifest, write_manifest
from augment_gan.outputs import check_class_name, check_out_folder, class_folder, clear_outputs, write_json
from augment_gan.validation import check_types

SETTINGS = "vary.json"


@dataclass(frozen=True)
class VaryConfig:
    """Options of one `vary` call."""

    n: int = 4
    """Variations per source image."""
    sigma: float = 0.5
    """Std of the latent perturbation, in units of the prior's std (z ~ N(0, I))."""
    seed: int = 0
    class_name: str | None = None
    """Class of an unlabeled source: G's label (conditional checkpoints) and the output subfolder."""
    overwrite: bool = False
    device: str = "auto"
    batch_size: int = 256
    workers: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_types(self)
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise UserError(f"--n must be a positive integer, got {self.n!r}")
        if not 0.0 <= self.sigma <= 10.0:
            raise UserError(f"--sigma must be in [0, 10], got {self.sigma}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.class_name is not None:
            check_class_name(self.class_name)


@dataclass
class VarySummary:
    out: str
    sources: int
    per_source: int
    written: int
    existing: int
    images: int
    manifest: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _identity(settings: dict[str, Any]) -> dict[str, Any]:
    keys = ("checkpoint", "source", "n", "sigma", "seed", "class_name", "classes")
    return {k: settings.get(k) for k in keys}


def _read_sources(source: Path, ckpt: Any, progress: bool) -> tuple[np.ndarray, list[str], list[str | None], list[str]]:
    """-> (uint8 N×H×W×C, relative files, class per image (None when unlabeled), source classes)."""
    from augment_gan.data import ReadOptions, load_folder, read_image

    options = ReadOptions.from_checkpoint(ckpt)  # read the sources the way fit read its training images
    if source.is_file():
        return read_image(source, options)[None], [source.name], [None], []
    if not source.is_dir():
        raise UserError(f"source image or folder not found: {source}")
    # No cache: reading the user's folder must not write anywhere but the output folder.
    images = load_folder(source, options, progress=progress, use_cache=False)
    if images.labels is None:
        return images.images, list(images.files), [None] * len(images.files), []
    names = [check_class_name(c) for c in images.classes]
    return images.images, list(images.files), [names[int(i)] for i in images.labels], names


def _remove_old_outputs(out: Path, keep: set[str]) -> None:
    """Delete the images an earlier vary listed in its manifest that this run will not rewrite."""
    listed = {row.file for row in read_manifest(out / MANIFEST, strict=False)}
    clear_outputs(out, lambda rel: rel in listed and rel not in keep and rel.endswith(".png"))


def vary(checkpoint: Any, source: str | Path, out: str | Path, config: VaryConfig | None = None,
         **options: Any) -> VarySummary:
    """Write `config.n` variations of every image of `source` (a file or a folder) into `out` (`augment-gan vary`).

    Give the settings as a `VaryConfig` or as its fields: `vary("runs/digits", "examples/digits", "var", n=4)`.
    """
    if config is None:
        config = VaryConfig(**options)
    elif options:
        raise TypeError("give either a VaryConfig or its fields as keywords, not both")
    import torch
    from tqdm import tqdm

    from augment_gan import sample
    from augment_gan.pixels import hwc_to_nchw

    t_start = time.perf_counter()
    device = pick_device(config.device)
    if hasattr(checkpoint, "G_ema"):
        ckpt = checkpoint
    else:
        from augment_gan.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, device=device)
    ckpt.G_ema.to(device)
    ckpt.E.to(device)
    source, out = Path(source), Path(out)
    arrays, files, source_class, source_classes = _read_sources(source, ckpt, config.progress)

    # Classes: the source's when labeled, else --class; a conditional G needs one it knows.
    if config.class_name is not None:
        if source_classes:
            raise UserError(f"{source} is labeled (class subfolders); --class is for an unlabeled source")
        source_class = [config.class_name] * len(files)
    classes = list(ckpt.classes) if ckpt.num_classes else (source_classes or
                                                           ([config.class_name] if config.class_name else []))
    if ckpt.num_classes:
        if any(c is None for c in source_class):
            raise UserError(f"this checkpoint is class-conditional ({', '.join(ckpt.classes)}): pass --class NAME "
                            "for an unlabeled source")
        unknown = sorted({c for c in source_class if c not in ckpt.classes})
        if unknown:
            raise UserError(f"source classes {', '.join(unknown)} are not classes of the checkpoint "
                            f"({', '.join(ckpt.classes)})")
    labels = [classes.index(c) if c is not None else None for c in source_class]

    # Output names: <class>/<stem>_<k>.png; two sources must not share one.
    outputs: dict[str, str] = {}
    for rel, cls in zip(files, source_class):
        stem = Path(rel).stem
        for k in range(config.n):
            name = f"{stem}_{k}.png" if cls is None else f"{cls}/{stem}_{k}.png"
            if name in outputs:
                raise UserError(f"{outputs[name]} and {rel} would both write {name}; rename one of them")
            outputs[name] = rel

    settings = {"package_version": __version__, "checkpoint": ckpt.digest, "checkpoint_path": str(Path(ckpt.path).resolve()),
                "source": str(source.resolve()), "n": config.n, "sigma": config.sigma, "seed": config.seed,
                "class_name": config.class_name, "classes": classes, "sources": len(files),
                "latent": "z = mu + sigma * eps, eps ~ N(0, I) from (seed, source file, k)"}
    # A second vary into this folder would remove this one's temporaries: it is refused.
    with output_lock(out, "vary"):
        old, replace = check_out_folder(out, SETTINGS, overwrite=config.overwrite, settings=settings,
                                        identity=_identity)
        if replace:  # only reached with --overwrite
            _remove_old_outputs(out, set(outputs))
        if old != settings:
            write_json(out / SETTINGS, settings)
        for cls in sorted({c for c in source_class if c is not None}):
            class_folder(out, cls)
        for p in [out, *(out / c for c in set(source_class) if c is not None)]:
            for tmp in p.glob("*.tmp-*"):
                tmp.unlink(missing_ok=True)  # left by a killed run (we hold the folder's lock)

        rows: list[ManifestRow] = []
        written = existing = 0
        jobs = []  # (source position, k, name)
        for s, (rel, cls) in enumerate(zip(files, source_class)):
            for k in range(config.n):
                name = f"{Path(rel).stem}_{k}.png" if cls is None else f"{cls}/{Path(rel).stem}_{k}.png"
                jobs.append((s, k, name))
        done = set()
        if not config.overwrite:
            done = {name for (_, _, name) in jobs if readable_image(out / name, ckpt.resolution)}

        def row(s: int, k: int, name: str, std: float) -> ManifestRow:
            return ManifestRow(file=name, index=s * config.n + k, seed=config.seed, class_name=source_class[s],
                               label=labels[s], checkpoint=ckpt.digest, source=files[s], k=k, sigma=config.sigma,
                               posterior_std=std)

        workers = config.workers or default_workers(device.type)
        bar = tqdm(total=len(jobs) - len(done), desc="vary", unit="img", file=sys.stderr,
                   disable=not config.progress or len(jobs) == len(done), dynamic_ncols=True)

        def on_done(batch_rows: list[ManifestRow]) -> None:
            rows.extend(batch_rows)
            bar.update(len(batch_rows))

        writer = ImageWriter(workers, "png", None, on_done)
        ok = False
        try:
            # Encode every source once (E is cheap next to G), then decode the variations in batches.
            images = hwc_to_nchw(arrays)  # uint8 N×C×H×W
            mus, stds = [], []
            for start in range(0, len(images), config.batch_size):
                mu, logvar = sample.encode(ckpt, images[start:start + config.batch_size], device=device)
                mus.append(mu)
                stds.append(logvar.mul(0.5).exp().mean(1))
            mu_all, std_all = torch.cat(mus), torch.cat(stds)
            todo = [job for job in jobs if job[2] not in done]
            for s, k, name in jobs:
                if name in done:
                    rows.append(row(s, k, name, round(float(std_all[s]), 6)))
                    existing += 1
            for start in range(0, len(todo), config.batch_size):
                batch = todo[start:start + config.batch_size]
                eps = torch.cat([sample.latents(sample.derive_seed(config.seed, "vary", files[s]), [k], ckpt.z_dim)
                                 for s, k, _ in batch])
                z = mu_all[[s for s, _, _ in batch]] + config.sigma * eps
                y = [labels[s] for s, _, _ in batch] if ckpt.num_classes else None
                writer.submit(sample.decode(ckpt, z, y, device=device), [str(out / name) for _, _, name in batch],
                              [row(s, k, name, round(float(std_all[s]), 6)) for s, k, name in batch])
                written += len(batch)
            writer.drain()
            ok = True
        finally:
            writer.close(ok)
            bar.close()
        write_manifest(out / MANIFEST, rows)
        return VarySummary(out=str(out), sources=len(files), per_source=config.n, written=written,
                           existing=existing, images=len(rows), manifest=str(out / MANIFEST),
                           seconds=round(time.perf_counter() - t_start, 3))
