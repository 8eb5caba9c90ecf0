"""Benchmark `augment-gan fit` against a plain DCGAN the way users run it: each model alone on the machine.

For each dataset (32 px) and seed: train a small CNN classifier on the real labels (its penultimate layer
is the feature space of the scores), then train the DCGAN references (PyTorch examples, batch 64 and 32)
and augment-gan (default config, and with --ablations one variant per setting) one after another, each
alone, with all cores and torch's default threads, for the same wall-clock budget; draw N samples from each
and report steps, images/s, the Fréchet distance (FD) and KID of the samples to the real images in the
classifier's features, and FD / the best DCGAN's FD. Labels are ignored by every GAN (unconditional), so
the models solve the same task. Never run other heavy work on the machine while this runs.

    python benchmarks/bench_fit.py --seeds 0,1,2                      # mnist + emoji, 5 wall-minutes per model
    python benchmarks/bench_fit.py --curve-minutes 0.5                # + FD of every checkpoint along the run
    python benchmarks/bench_fit.py --ablations                        # + the ablation variants
    python benchmarks/bench_fit.py --clock cpu --threads 1            # extra: CPU-time budget, one thread
                                                                      # (for side-by-side runs on a busy machine)

Prints one markdown table to stdout (progress to stderr); writes results.json, a sample grid PNG per model
and the augment-gan run folders under --out.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
import dcgan_reference  # noqa: E402

from augment_gan import __version__  # noqa: E402
from augment_gan.atomic import write_bytes_atomic
from augment_gan.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from augment_gan.classifier import accuracy, stratified_split, train_classifier  # noqa: E402
from augment_gan.config import TrainConfig  # noqa: E402
from augment_gan.data import ReadOptions, load_folder  # noqa: E402
from augment_gan.errors import UserError  # noqa: E402
from augment_gan.grid import tile  # noqa: E402
from augment_gan.metrics import FeatureExtractor, frechet_distance, kernel_distance  # noqa: E402
from augment_gan.pixels import hwc_to_nchw, nchw_to_hwc, to_float  # noqa: E402
from augment_gan.sample import generate  # noqa: E402
from augment_gan.train import fit  # noqa: E402

RESOLUTION = 32
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repo
DATASETS = {"mnist": "mnist", "emoji": "emoji-twitter"}

FIXED_P = 0.3
"""Constant augmentation probability of the `fixed-p` ablation: mid-range of what ADA settles at on
small sets (Karras et al. 2020, fig. 5); if ADA's p stays near 0 in a short run, this variant shows
whether augmenting at all would have helped."""

# The ablation: each variant changes one thing in the default configuration, so its row says what that
# thing contributes at this budget. Rotation and completion (off by default) are switched on at SSGAN's
# weights (`selfsup-on`: both); the encoder, mode seeking and the augmentation (on by default) are switched
# off, or the encoder trained every step instead of every 4th; `fixed-p` replaces the adaptive probability
# by a constant. `lr2e-4` and `batch-64` are DCGAN's settings, which the default left.
ROTATION_ON = {"rotation_d_weight": 1.0, "rotation_g_weight": 0.2}
VARIANTS: dict[str, dict] = {
    "default": {},
    "rotation-on": ROTATION_ON,
    "completion-on": {"completion_weight": 1.0},
    "selfsup-on": {**ROTATION_ON, "completion_weight": 1.0},
    "encoder-off": {"encoder_weight": 0.0},
    "encoder-every-step": {"encoder_interval": 1},
    "mode-seeking-off": {"mode_seeking_weight": 0.0},
    "diffaug-off": {"diffaug": ()},
    # Which DiffAugment op helps or leaks at 3,800+ steps (FD along the run with --curve-minutes).
    "all-ops": {"diffaug": ("color", "translation", "cutout")},   # the default before 2026-11-30
    "no-color": {"diffaug": ("translation", "cutout")},
    "color-only": {"diffaug": ("color",)},
    "fixed-p": {"fixed_p": FIXED_P},
    "lr2e-4": {"g_lr": 2e-4, "d_lr": 2e-4},
    "batch-64": {"batch_size": 64},
    "lr6e-4": {"g_lr": 6e-4, "d_lr": 6e-4},
    "d-wide": {"d_channels": 64},
    "g-narrow": {"g_channels": 128},
}
"""augment-gan variants: TrainConfig overrides on top of `TrainConfig(resolution=32, conditional=False)`."""
DCGANS = {"dcgan": 64, "dcgan-b32": 32}
"""The DCGAN references and their batch sizes (lr 2e-4, β1 0.5 in both): the PyTorch examples' 64, and 32,
which takes twice the updates in a short budget. FD / DCGAN compares with the better of those that ran."""
MODELS = (*DCGANS, *VARIANTS)
BASELINE = ("dcgan", "dcgan-b32", "default")

TEST_FRACTION = 0.2  # held-out share for the classifier's accuracy (stratified)
SAMPLE_SEED = 1234   # latents of the scored samples; the same for every model
GRID_SAMPLES = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per model (default 5)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="wall",
                    help="what --minutes counts: wall time (default: what a user gets) or this process's CPU "
                         "time (an extra, for side-by-side runs on a shared machine)")
    ap.add_argument("--datasets", default="mnist,emoji",
                    help="comma-separated: mnist, emoji (from --data-root) or NAME=FOLDER (default mnist,emoji)")
    ap.add_argument("--data-root", type=Path, default=SHARED_DATA, help=f"where mnist/ and emoji-twitter/ are (default {SHARED_DATA})")
    ap.add_argument("--samples", type=int, default=2000, help="samples scored per model (default 2000)")
    ap.add_argument("--ablations", action="store_true", help=f"also train the variants {', '.join(VARIANTS)}")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated models to train, from {', '.join(MODELS)} (overrides --ablations)")
    ap.add_argument("--classifier-steps", type=int, default=300, help="training steps of the feature classifier (default 300)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads; 0 (default) keeps torch's default, as a user's run does")
    ap.add_argument("--device", default="cpu", help="device for every model (default cpu)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, each a full repetition (default 0)")
    ap.add_argument("--curve-minutes", type=float, default=None,
                    help="augment-gan variants: write a checkpoint this often and score every one (FD along the run)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<timestamp>)")
    return ap.parse_args(argv)


def resolve_datasets(spec: str, root: Path) -> list[tuple[str, Path]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" in item:
            name, path = item.split("=", 1)
            out.append((name.strip(), Path(path).expanduser()))
        elif item in DATASETS:
            out.append((item, root / DATASETS[item]))
        else:
            raise UserError(f"unknown dataset {item!r}: use {', '.join(DATASETS)} or NAME=FOLDER")
    if not out:
        raise UserError("--datasets is empty")
    for name, path in out:
        if not path.is_dir():
            raise UserError(f"dataset {name}: folder not found: {path}")
    return out


def resolve_models(args: argparse.Namespace) -> list[str]:
    if args.variants is None:
        return list(MODELS if args.ablations else BASELINE)
    models = [m.strip() for m in args.variants.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise UserError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    return list(dict.fromkeys(models))


def log(msg: str) -> None:
    print(f"[bench_fit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def save_grid_png(images: np.ndarray, path: Path) -> None:
    """uint8 N×H×W×C -> PNG grid (8 columns), written atomically."""
    array = tile(images[:GRID_SAMPLES], 8)
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def write_results(results: dict, out: Path) -> None:
    """Rewritten after every model, so a crash or Ctrl-C keeps what was measured."""
    write_bytes_atomic(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())


def train_yardstick(images: np.ndarray, labels: np.ndarray, steps: int, seed: int) -> tuple[FeatureExtractor, dict]:
    """The feature network: the small CNN from `augment_gan.classifier`, trained on 80% of the labeled real
    images; its test accuracy on the other 20% says whether its features separate the classes at all."""
    train_idx, test_idx = stratified_split(labels, TEST_FRACTION, seed)
    t0 = time.monotonic()
    model = train_classifier(images[train_idx], labels[train_idx], steps=steps, seed=seed,
                             num_classes=int(labels.max()) + 1)
    seconds = time.monotonic() - t0
    acc = accuracy(model, images[test_idx], labels[test_idx])
    name = f"classifier-penultimate ({model.feature_dim}-d, {steps} steps, seed {seed})"
    extractor = FeatureExtractor(name, lambda x: model.features(to_float(x)))
    return extractor, {"features": name, "test_accuracy": acc, "train_images": len(train_idx),
                       "test_images": len(test_idx), "steps": steps, "seconds": round(seconds, 1)}


def real_floor(real_features: np.ndarray, seed: int) -> dict:
    """FD between two disjoint random halves of the real set: what a perfect generator would score.

    The halves hold fewer images than `--samples` on small sets (emoji: 953 each) and FD is biased upward
    at small N, so read it as an order of magnitude, not an exact lower bound."""
    perm = np.random.default_rng(seed).permutation(len(real_features))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    return {"fd": frechet_distance(real_features[a], real_features[b]), "sizes": [len(a), len(b)]}


def run_dcgan(data: torch.Tensor, batch_size: int, args: argparse.Namespace, seed: int) -> tuple[np.ndarray, dict]:
    G, stats = dcgan_reference.train(
        data, minutes=args.minutes, clock=args.clock, seed=seed, device=args.device, batch_size=batch_size,
        progress=lambda s, d, g: log(f"  dcgan step {s}: loss_d {d:.3f} loss_g {g:.3f}") if s % 500 == 0 else None)
    samples = dcgan_reference.sample(G, args.samples, seed=SAMPLE_SEED, device=args.device, batch_size=batch_size)
    return nchw_to_hwc(samples), {**stats, "batch_size": batch_size}


def _samples(ckpt, n: int, device: str) -> np.ndarray:
    return nchw_to_hwc(torch.cat([generate(ckpt, range(s, min(s + 500, n)), seed=SAMPLE_SEED, device=device)
                                  for s in range(0, n, 500)]))


def run_augment_gan(folder: Path, overrides: dict, args: argparse.Namespace, seed: int, run_dir: Path,
                    cache_dir: Path, score) -> tuple[np.ndarray, dict]:
    # conditional=False: mnist's and emoji's labels are ignored by every GAN here, so augment-gan and the
    # (unconditional) DCGAN solve the same problem.
    config = TrainConfig(resolution=RESOLUTION, minutes=args.minutes, clock=args.clock, conditional=False,
                         seed=seed).replace(**overrides)
    if args.curve_minutes:
        config = config.replace(checkpoint_minutes=args.curve_minutes)
    path = fit(folder, config, run_dir, device=args.device, cache_dir=cache_dir, progress=False)
    ckpt = load_checkpoint(path, device=args.device)
    meta = ckpt.meta
    p_seen = [json.loads(line)["p"] for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    stats = {"steps": meta.step, "kimg": meta.kimg, "train_seconds": meta.elapsed_s,
             "ada_p": meta.ada_p, "ada_rt": meta.ada.get("rt"), "p_max_seen": max(p_seen, default=None),
             "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
             "checkpoint": str(path)}
    if args.curve_minutes:   # FD of every checkpoint of the run, in the same features: does quality keep rising?
        stats["curve"] = []
        for cp in list_checkpoints(run_dir):
            c = load_checkpoint(cp, device=args.device)
            fd, _ = score(_samples(c, args.samples, args.device))
            stats["curve"].append({"step": c.step, "kimg": round(c.meta.kimg, 2), "seconds": round(c.meta.elapsed_s, 1),
                                   "ada_p": round(c.meta.ada_p, 3), "fd": fd})
            log(f"  step {c.step}: FD {fd:.2f} (p {c.meta.ada_p:.3f})")
    return _samples(ckpt, args.samples, args.device), stats


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(results: dict) -> str:
    lines = ["| dataset | seed | model | steps | img/s | FD ↓ | KID ×10³ ↓ | FD / best DCGAN | final p |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    notes, curves = [], []
    for run in results["runs"]:
        for model, r in run["models"].items():
            lines.append(f"| {run['dataset']} | {run['seed']} | {model} | {r['steps']:,} | {fmt(r.get('img_per_s'), 0)} | "
                         f"{fmt(r['fd'])} | {fmt(r['kid'] * 1000 if r.get('kid') is not None else None)} | "
                         f"{fmt(r.get('fd_ratio'), 3)} | {fmt(r.get('ada_p'), 3) if model not in DCGANS else '—'} |")
            if r.get("curve"):
                points = ", ".join(f"{c['step']}: {c['fd']:.2f}" for c in r["curve"])
                curves.append(f"- {run['dataset']} seed {run['seed']} {model}, FD by step: {points}")
        c = run["classifier"]
        notes.append(f"- {run['dataset']} seed {run['seed']}: {run['images']} real images ({run['channels']} channel(s)); "
                     f"feature classifier test accuracy {c['test_accuracy']:.3f}; real-vs-real floor FD "
                     f"{run['floor']['fd']:.2f} (two halves of {run['floor']['sizes'][0]}); "
                     f"best DCGAN: {run.get('best_dcgan') or '—'}")
    threads = results["threads"] or f"torch default ({results['torch_threads']})"
    head = (f"Budget {results['minutes']:g} min of {results.get('clock', 'wall')} time per model, each model alone, "
            f"{threads} thread(s) on {results['device']}; FD and KID of {results['samples']} samples vs all real "
            f"images in the classifier's penultimate features.")
    return "\n".join([head, "", *lines, "", *notes, *([""] + curves if curves else [])])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = "python benchmarks/bench_fit.py " + " ".join(argv)
    try:
        if args.minutes <= 0 or args.samples < 2 or args.classifier_steps < 1 or args.threads < 0:
            raise UserError("--minutes must be > 0, --samples >= 2, --classifier-steps >= 1, --threads >= 0")
        if args.curve_minutes is not None and args.curve_minutes <= 0:
            raise UserError("--curve-minutes must be > 0")
        try:
            args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if not args.seed_list:
            raise UserError("--seeds is empty")
        datasets = resolve_datasets(args.datasets, args.data_root)
        models = resolve_models(args)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = args.out or Path(__file__).resolve().parent / "results" / stamp
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        return _run(args, datasets, models, out)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, datasets: list[tuple[str, Path]], models: list[str], out: Path) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = out / "cache"
    results: dict = {"command": args.command, "started": _dt.datetime.now().isoformat(timespec="seconds"),
                     "package_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
                     "cpus": os.cpu_count(), "minutes": args.minutes, "clock": args.clock, "samples": args.samples,
                     "threads": args.threads, "torch_threads": torch.get_num_threads(), "device": args.device,
                     "seeds": args.seed_list, "resolution": RESOLUTION, "models": models, "runs": []}
    if args.device.startswith("cuda"):
        # A lent GPU confirms that fit's loop has no host-device sync per step: warn on every sync.
        torch.cuda.set_sync_debug_mode("warn")
    for ds_name, folder in datasets:
        # Load training set once; every model reads this cache (augment-gan's fit memory-maps it).
        real = load_folder(folder, ReadOptions(resolution=RESOLUTION), cache_dir=cache_dir, progress=False)
        if real.labels is None or len(real.classes) < 2:
            raise UserError(f"dataset {ds_name}: the feature classifier needs class subfolders in {folder}")
        images, labels = np.ascontiguousarray(real.images), np.asarray(real.labels)
        log(f"{ds_name}: {len(images)} images, {real.channels} channel(s), {len(real.classes)} classes")
        for seed in args.seed_list:
            _run_seed(args, ds_name, folder, real, images, labels, seed, models, out, cache_dir, results)

    table = markdown_table(results)
    write_bytes_atomic(out / "table.md", (table + "\n").encode())
    print(table)
    log(f"results in {out}")
    return 0


def _run_seed(args, ds_name, folder, real, images, labels, seed, models, out, cache_dir, results) -> None:
    tag = f"{ds_name}-s{seed}"
    run = {"dataset": ds_name, "seed": seed, "path": str(folder), "images": len(images), "channels": real.channels,
           "classes": list(real.classes), "models": {}}
    results["runs"].append(run)
    (out / tag).mkdir(exist_ok=True)
    save_grid_png(images[np.random.default_rng(seed).permutation(len(images))], out / tag / "real.png")

    extractor, run["classifier"] = train_yardstick(images, labels, args.classifier_steps, seed)
    log(f"{tag}: classifier test accuracy {run['classifier']['test_accuracy']:.3f} ({run['classifier']['seconds']} s)")
    real_features = extractor(images)
    run["floor"] = real_floor(real_features, seed)
    write_results(results, out)

    def score(fake: np.ndarray) -> tuple[float, float]:
        features = extractor(fake)
        return frechet_distance(real_features, features), kernel_distance(real_features, features, seed=seed)[0]

    for model in models:
        log(f"{tag}: training {model} for {args.minutes:g} {args.clock} minutes")
        if model in DCGANS:
            fake, stats = run_dcgan(hwc_to_nchw(images), DCGANS[model], args, seed)
        else:
            fake, stats = run_augment_gan(folder, VARIANTS[model], args, seed, out / tag / model, cache_dir, score)
        fd, kid = score(fake)
        grid = out / tag / f"{model}.png"
        save_grid_png(fake, grid)
        run["models"][model] = {**stats, "fd": fd, "kid": kid, "grid": str(grid.relative_to(out)),
                                "img_per_s": stats["kimg"] * 1000 / max(stats["train_seconds"], 1e-9)}
        log(f"{tag}: {model}: FD {fd:.2f}, KID {kid:.4f} after {stats['kimg']:.1f} kimg ({stats['steps']} steps)")
        dcgans = {m: r["fd"] for m, r in run["models"].items() if m in DCGANS}
        if dcgans:
            best = min(dcgans, key=dcgans.get)
            run["best_dcgan"] = best
            for r in run["models"].values():
                r["fd_ratio"] = r["fd"] / dcgans[best]
        write_results(results, out)


if __name__ == "__main__":
    sys.exit(main())
