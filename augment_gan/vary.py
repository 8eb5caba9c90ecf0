"""Variations of real images: encode with the latent encoder E, perturb the latent, decode with G_ema.

Variation k of a source image is G(mu + sigma·eps_k), where (mu, logvar) = E(image) and eps_k ~ N(0, I)
comes from `sample.latents(derive_seed(seed, source path), [k])`. sigma is in z-space units — the
prior's standard deviation — rather than a multiple of E's posterior std exp(logvar/2): E is trained with a
small KL weight, so its posterior is narrow and uneven across images, while G was trained on z ~ N(0, I),
so sigma means the same distance for every image and every checkpoint (0 reconstructs, 1 is as far as a
fresh sample's spread). The manifest records mu's posterior std anyway, for those who want to compare.

A labeled source folder (ImageFolder layout) keeps its classes: DIR/<class>/<stem>_<k>.png; a conditional
checkpoint also gets the class as G's label, so labeled data grows even without a conditional model.

`interpolate` (DeepSMOTE-style oversampling in the latent space, Dablain et al. 2022): variation k of source a
decodes mu_a + lam·(mu_b − mu_a) + sigma·eps_k instead, where b is one of a's `neighbours` nearest sources of
the same class in E's latent space (mu, Euclidean) and lam ~ U(0, 1), both drawn from (seed, a's path, k). The
images stay inside the class's own spread of real images rather than around each one; a class with a single
image has no partner and gets its noise only. sigma defaults to 0.5 for variations and 0.25 for interpolation.

`balance` replaces "n per source image" by "as many as each class lacks": a labeled source's class c gets
max(0, N − n_c) images, N = `balance_to` or the largest class's count, its sources taking turns (the j-th image
of the class comes from source j mod n_c, as its variation j div n_c), so real + written is balanced.
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
SIGMA = 0.5
"""Default latent noise of variations."""
INTERPOLATE_SIGMA = 0.25
"""Default latent noise with `interpolate`: the segment already spreads the images; a little noise keeps a
class of one image from repeating one picture."""


@dataclass(frozen=True)
class VaryConfig:
    """Options of one `vary` call."""

    n: int | None = None
    """Variations per source image (default 4). Not with `balance`, which sets the count per class."""
    sigma: float | None = None
    """Std of the latent noise, in units of the prior's std (z ~ N(0, I)); default 0.5, or 0.25 with `interpolate`."""
    interpolate: bool = False
    """Decode points between a source and a same-class latent neighbour instead of around the source alone."""
    neighbours: int = 5
    """`interpolate`: partners are drawn from this many nearest same-class sources."""
    balance: bool = False
    """Write per class what it lacks to reach `balance_to` (default: the largest class), instead of `n` per image."""
    balance_to: int | None = None
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
        if self.balance:
            if self.n is not None:
                raise UserError("--balance sets how many images each class gets; give it without --n")
            if self.balance_to is not None and self.balance_to < 1:
                raise UserError(f"--balance-to must be a positive integer, got {self.balance_to}")
            if self.class_name is not None:
                raise UserError("--balance needs a labeled source folder (class subfolders), not --class")
        elif self.balance_to is not None:
            raise UserError("--balance-to needs --balance")
        if self.n is not None and self.n < 1:
            raise UserError(f"--n must be a positive integer, got {self.n!r}")
        if self.sigma is not None and not 0.0 <= self.sigma <= 10.0:
            raise UserError(f"--sigma must be in [0, 10], got {self.sigma}")
        if self.neighbours < 1:
            raise UserError(f"--neighbours must be >= 1, got {self.neighbours}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.class_name is not None:
            check_class_name(self.class_name)

    @property
    def per_source(self) -> int:
        """Variations per source image without `balance`."""
        return 4 if self.n is None else self.n

    @property
    def noise(self) -> float:
        """sigma, or its default for the mode."""
        if self.sigma is not None:
            return self.sigma
        return INTERPOLATE_SIGMA if self.interpolate else SIGMA


@dataclass
class VarySummary:
    out: str
    sources: int
    per_source: int | None
    """Variations per source image; None with `balance` (see `per_class`)."""
    written: int
    existing: int
    images: int
    manifest: str
    seconds: float
    per_class: dict[str, int] | None = None
    """Images written per class (labeled sources)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _identity(settings: dict[str, Any]) -> dict[str, Any]:
    keys = ("checkpoint", "source", "n", "sigma", "seed", "class_name", "classes", "interpolate", "neighbours",
            "balance", "balance_to")
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


def _output_name(rel: str, cls: str | None, k: int) -> str:
    return f"{Path(rel).stem}_{k}.png" if cls is None else f"{cls}/{Path(rel).stem}_{k}.png"


def plan_jobs(files: list[str], source_class: list[str | None], config: VaryConfig) -> list[tuple[int, int, str]]:
    """(source position, k, output name) of every image to write, in index order (`index` = position here)."""
    if not config.balance:
        return [(s, k, _output_name(rel, source_class[s], k)) for s, rel in enumerate(files)
                for k in range(config.per_source)]
    members: dict[str, list[int]] = {}
    for s, cls in enumerate(source_class):
        members.setdefault(cls, []).append(s)  # type: ignore[arg-type]
    target = config.balance_to or max(len(m) for m in members.values())
    jobs = []
    for cls in sorted(members):
        m = members[cls]
        for j in range(max(0, target - len(m))):
            s, k = m[j % len(m)], j // len(m)
            jobs.append((s, k, _output_name(files[s], cls, k)))
    if not jobs:
        counts = ", ".join(f"{c}: {len(m)}" for c, m in sorted(members.items()))
        raise UserError(f"nothing to write: every class already has >= {target} images ({counts}); raise --balance-to")
    return jobs


def latent_partners(mu: Any, source_class: list[str | None], k: int) -> list[list[int]]:
    """Per source, its up-to-k nearest other sources of the same class by Euclidean distance between E's means
    (itself when it is alone in its class)."""
    import torch

    groups: dict[str | None, list[int]] = {}
    for s, cls in enumerate(source_class):
        groups.setdefault(cls, []).append(s)
    partners: list[list[int]] = [[] for _ in source_class]
    for members in groups.values():
        kk = min(k, len(members) - 1)
        if kk == 0:
            partners[members[0]] = [members[0]]
            continue
        z = mu[torch.tensor(members)].double()
        for start in range(0, len(members), 1024):
            d = torch.cdist(z[start:start + 1024], z)
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
            nearest = d.topk(kk, largest=False).indices.tolist()
            for row, s in enumerate(members[start:start + 1024]):
                partners[s] = [members[j] for j in nearest[row]]
    return partners


def interpolation_draw(seed: int, source_file: str, k: int, partners: list[int]) -> tuple[int, float]:
    """(partner, lam) of interpolation k of a source: a pure function of (seed, source path, k)."""
    from augment_gan.sample import derive_seed

    rng = np.random.default_rng(derive_seed(seed, "interpolate", source_file, k))
    return partners[int(rng.integers(len(partners)))], float(rng.random())


def _settings(ckpt: Any, source: Path, config: VaryConfig, classes: list[str], sources: int) -> dict[str, Any]:
    """The vary.json of a call: what defines its images (`_identity`) and how they were made."""
    return {"package_version": __version__, "checkpoint": ckpt.digest,
            "checkpoint_path": str(Path(ckpt.path).resolve()), "source": str(source.resolve()),
            "n": None if config.balance else config.per_source, "sigma": config.noise, "seed": config.seed,
            "class_name": config.class_name, "classes": classes, "sources": sources,
            "interpolate": config.interpolate, "neighbours": config.neighbours if config.interpolate else None,
            "balance": config.balance, "balance_to": config.balance_to,
            "latent": ("z = mu_a + lam * (mu_b - mu_a) + sigma * eps, b a same-class latent neighbour of a, "
                       "lam ~ U(0, 1), eps ~ N(0, I), all from (seed, source file, k)") if config.interpolate
            else "z = mu + sigma * eps, eps ~ N(0, I) from (seed, source file, k)"}


def vary(checkpoint: Any, source: str | Path, out: str | Path, config: VaryConfig | None = None,
         **options: Any) -> VarySummary:
    """Write `config.n` variations of every image of `source` (a file or a folder) into `out` (`augment-gan vary`),
    or with `balance` what each class lacks; `interpolate` decodes between same-class neighbours (module doc).

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

    if config.balance and not source_classes:
        raise UserError(f"--balance needs a labeled source folder (class subfolders); {source} has none")
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

    jobs = plan_jobs(files, source_class, config)
    # Output names: <class>/<stem>_<k>.png; two sources must not share one.
    outputs: dict[str, str] = {}
    for s, k, name in jobs:
        if outputs.get(name, files[s]) != files[s]:
            raise UserError(f"{outputs[name]} and {files[s]} would both write {name}; rename one of them")
        outputs[name] = files[s]

    settings = _settings(ckpt, source, config, classes, len(files))
    # A second vary into this folder would remove this one's temporaries: it is refused.
    with output_lock(out, "vary"):
        old, replace = check_out_folder(out, SETTINGS, overwrite=config.overwrite, settings=settings,
                                        identity=_identity)
        if replace:  # only reached with --overwrite
            _remove_old_outputs(out, set(outputs))
        if old != settings:
            write_json(out / SETTINGS, settings)
        for cls in sorted({source_class[s] for s, _, _ in jobs if source_class[s] is not None}):
            class_folder(out, cls)
        for p in [out, *(out / c for c in set(source_class) if c is not None)]:
            for tmp in p.glob("*.tmp-*"):
                tmp.unlink(missing_ok=True)  # left by a killed run (we hold the folder's lock)

        rows: list[ManifestRow] = []
        written = existing = 0
        done = set()
        if not config.overwrite:
            done = {name for (_, _, name) in jobs if readable_image(out / name, ckpt.resolution)}

        partners: list[list[int]] = []
        position = {name: i for i, (_, _, name) in enumerate(jobs)}

        def draw(s: int, k: int) -> tuple[int | None, float | None]:
            if not config.interpolate:
                return None, None
            return interpolation_draw(config.seed, files[s], k, partners[s])

        def row(s: int, k: int, name: str, std: float, pair: tuple[int | None, float | None]) -> ManifestRow:
            b, lam = pair  # draw(s, k), drawn once by the caller
            return ManifestRow(file=name, index=position[name], seed=config.seed, class_name=source_class[s],
                               label=labels[s], checkpoint=ckpt.digest, source=files[s], k=k, sigma=config.noise,
                               posterior_std=std, partner=files[b] if b is not None else None,
                               mix=round(lam, 6) if lam is not None else None)

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
            if config.interpolate:
                partners.extend(latent_partners(mu_all, source_class, config.neighbours))
            todo = [job for job in jobs if job[2] not in done]
            for s, k, name in jobs:
                if name in done:
                    rows.append(row(s, k, name, round(float(std_all[s]), 6), draw(s, k)))
                    existing += 1
            for start in range(0, len(todo), config.batch_size):
                batch = todo[start:start + config.batch_size]
                eps = torch.cat([sample.latents(sample.derive_seed(config.seed, "vary", files[s]), [k], ckpt.z_dim)
                                 for s, k, _ in batch])
                z = mu_all[[s for s, _, _ in batch]] + config.noise * eps
                pairs = [draw(s, k) for s, k, _ in batch]
                if config.interpolate:
                    lam = torch.tensor([m for _, m in pairs], dtype=z.dtype, device=z.device)[:, None]
                    z = z + lam * (mu_all[[b for b, _ in pairs]] - mu_all[[s for s, _, _ in batch]])
                y = [labels[s] for s, _, _ in batch] if ckpt.num_classes else None
                writer.submit(sample.decode(ckpt, z, y, device=device), [str(out / name) for _, _, name in batch],
                              [row(s, k, name, round(float(std_all[s]), 6), pair)
                               for (s, k, name), pair in zip(batch, pairs)])
                written += len(batch)
            writer.drain()
            ok = True
        finally:
            writer.close(ok)
            bar.close()
        write_manifest(out / MANIFEST, rows)
        per_class: dict[str, int] = {}
        for s, _, _ in jobs:
            if source_class[s] is not None:
                per_class[source_class[s]] = per_class.get(source_class[s], 0) + 1  # type: ignore[index]
        return VarySummary(out=str(out), sources=len(files), per_source=None if config.balance else config.per_source,
                           written=written, existing=existing, images=len(rows), manifest=str(out / MANIFEST),
                           seconds=round(time.perf_counter() - t_start, 3), per_class=per_class or None)
