"""Benchmark `augment-gan fit` against a plain DCGAN at the same wall-clock budget (issue 3, "Measure").

For each dataset (32px): train a small CNN classifier on the real labels (its penultimate layer is the
feature space of the scores), then train the DCGAN reference and augment-gan (default config, and with
--ablations one variant per self-supervised constraint and augmentation setting) one after another for the
same number of minutes each, draw N samples from each, and report the Fréchet distance (FD) of the samples
to the real images in the classifier's features. Labels are ignored by every GAN (unconditional), so the
models are compared on the same task.

    python benchmarks/bench_fit.py                          # mnist + emoji, 5 minutes per model
    python benchmarks/bench_fit.py --ablations              # + the ablation variants
    python benchmarks/bench_fit.py --minutes 1 --samples 1000 --datasets mnist

Prints one markdown table to stdout (progress to stderr); writes results.json, a sample grid PNG per model
and the augment-gan run folders under --out.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import math
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
from augment_gan.checkpoint import load_checkpoint  # noqa: E402
from augment_gan.classifier import accuracy, stratified_split, train_classifier  # noqa: E402
from augment_gan.config import TrainConfig  # noqa: E402
from augment_gan.data import ReadOptions, load_folder  # noqa: E402
from augment_gan.errors import UserError  # noqa: E402
from augment_gan.grid import tile  # noqa: E402
from augment_gan.metrics import FeatureExtractor, frechet_distance  # noqa: E402
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
    "fixed-p": {"fixed_p": FIXED_P},
    "lr2e-4": {"g_lr": 2e-4, "d_lr": 2e-4},
    "batch-64": {"batch_size": 64},
    "lr6e-4": {"g_lr": 6e-4, "d_lr": 6e-4},
    "d-wide": {"d_channels": 64},
    "g-narrow": {"g_channels": 128},
}
"""augment-gan variants: TrainConfig overrides on top of `TrainConfig(resolution=32, conditional=False)`."""
MODELS = ("dcgan", *VARIANTS)
BASELINE = ("dcgan", "default")

TEST_FRACTION = 0.2  # held-out share for the classifier's accuracy (stratified)
SAMPLE_SEED = 1234   # latents of the scored samples; the same for every model
GRID_SAMPLES = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per model (default 5)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="what --minutes counts: this process's CPU time (default; fair on a shared machine) or wall time")
    ap.add_argument("--datasets", default="mnist,emoji",
                    help="comma-separated: mnist, emoji (from --data-root) or NAME=FOLDER (default mnist,emoji)")
    ap.add_argument("--data-root", type=Path, default=SHARED_DATA, help=f"where mnist/ and emoji-twitter/ are (default {SHARED_DATA})")
    ap.add_argument("--samples", type=int, default=2000, help="samples scored per model (default 2000)")
    ap.add_argument("--ablations", action="store_true", help=f"also train the variants {', '.join(VARIANTS)}")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated models to train, from {', '.join(MODELS)} (overrides --ablations)")
    ap.add_argument("--classifier-steps", type=int, default=300, help="training steps of the feature classifier (default 300)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--device", default="cpu", help="device for every model (default cpu)")
    ap.add_argument("--seed", type=int, default=0)
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


def run_dcgan(data: torch.Tensor, minutes: float, clock: str, n: int, seed: int, device: str
              ) -> tuple[np.ndarray, dict]:
    G, stats = dcgan_reference.train(
        data, minutes=minutes, clock=clock, seed=seed, device=device,
        progress=lambda s, d, g: log(f"  dcgan step {s}: loss_d {d:.3f} loss_g {g:.3f}") if s % 500 == 0 else None)
    samples = dcgan_reference.sample(G, n, seed=SAMPLE_SEED, device=device)
    return nchw_to_hwc(samples), stats


def run_augment_gan(folder: Path, overrides: dict, minutes: float, clock: str, n: int, seed: int, device: str,
                    run_dir: Path, cache_dir: Path) -> tuple[np.ndarray, dict]:
    # conditional=False: mnist's and emoji's labels are ignored by every GAN here, so augment-gan and the
    # (unconditional) DCGAN solve the same problem.
    config = TrainConfig(resolution=RESOLUTION, minutes=minutes, clock=clock, conditional=False,
                         seed=seed).replace(**overrides)
    path = fit(folder, config, run_dir, device=device, cache_dir=cache_dir, progress=False)
    ckpt = load_checkpoint(path, device=device)
    samples = torch.cat([generate(ckpt, range(s, min(s + 500, n)), seed=SAMPLE_SEED, device=device)
                         for s in range(0, n, 500)])
    meta = ckpt.meta
    p_seen = [json.loads(line)["p"] for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    stats = {"steps": meta.step, "kimg": meta.kimg, "train_seconds": meta.elapsed_s,
             "ada_p": meta.ada_p, "ada_rt": meta.ada.get("rt"), "p_max_seen": max(p_seen, default=None),
             "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
             "checkpoint": str(path)}
    return nchw_to_hwc(samples), stats


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(results: dict) -> str:
    lines = ["| dataset | model | kimg (steps) | FD ↓ | FD / DCGAN FD | final p |",
             "|---|---|---|---|---|---|"]
    notes = []
    for ds_name, ds in results["datasets"].items():
        for model, r in ds["models"].items():
            lines.append(f"| {ds_name} | {model} | {r['kimg']:.1f} ({r['steps']}) | {fmt(r['fd'])} | "
                         f"{fmt(r.get('fd_ratio'), 3)} | {fmt(r.get('ada_p'), 3) if model != 'dcgan' else '—'} |")
        c = ds["classifier"]
        notes.append(f"- {ds_name}: {ds['images']} real images ({ds['channels']} channel(s)); feature classifier "
                     f"test accuracy {c['test_accuracy']:.3f} ({c['test_images']} held-out images, "
                     f"{c['seconds']:.0f} s to train); real-vs-real floor FD {ds['floor']['fd']:.2f} "
                     f"(two halves of {ds['floor']['sizes'][0]})")
    head = (f"Budget {results['minutes']:g} min of {results.get('clock', 'wall')} time per model, "
            f"{results['threads']} thread(s) on {results['device']}; "
            f"FD of {results['samples']} samples vs all real images in the classifier's penultimate features.")
    return "\n".join([head, "", *lines, "", *notes])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = "python benchmarks/bench_fit.py " + " ".join(argv)
    try:
        if args.minutes <= 0 or args.samples < 2 or args.classifier_steps < 1 or args.threads < 1:
            raise UserError("--minutes must be > 0, --samples >= 2, --classifier-steps >= 1, --threads >= 1")
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
    torch.set_num_threads(args.threads)
    cache_dir = out / "cache"
    results: dict = {"command": args.command, "started": _dt.datetime.now().isoformat(timespec="seconds"),
                     "package_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
                     "minutes": args.minutes, "clock": args.clock, "samples": args.samples, "threads": args.threads, "device": args.device,
                     "seed": args.seed, "resolution": RESOLUTION, "models": models, "datasets": {}}
    for ds_name, folder in datasets:
        # Load training set once; every model reads this cache (augment-gan's fit memory-maps it).
        real = load_folder(folder, ReadOptions(resolution=RESOLUTION), cache_dir=cache_dir, progress=False)
        if real.labels is None or len(real.classes) < 2:
            raise UserError(f"dataset {ds_name}: the feature classifier needs class subfolders in {folder}")
        images, labels = np.ascontiguousarray(real.images), np.asarray(real.labels)
        log(f"{ds_name}: {len(images)} images, {real.channels} channel(s), {len(real.classes)} classes")
        ds = results["datasets"][ds_name] = {"path": str(folder), "images": len(images), "channels": real.channels,
                                             "classes": list(real.classes), "models": {}}
        (out / ds_name).mkdir(exist_ok=True)
        save_grid_png(images[np.random.default_rng(args.seed).permutation(len(images))], out / ds_name / "real.png")

        extractor, ds["classifier"] = train_yardstick(images, labels, args.classifier_steps, args.seed)
        log(f"{ds_name}: classifier test accuracy {ds['classifier']['test_accuracy']:.3f} "
            f"({ds['classifier']['seconds']} s)")
        real_features = extractor(images)
        ds["floor"] = real_floor(real_features, args.seed)
        write_results(results, out)

        for model in models:
            log(f"{ds_name}: training {model} for {args.minutes:g} min")
            if model == "dcgan":
                fake, stats = run_dcgan(hwc_to_nchw(images), args.minutes, args.clock, args.samples, args.seed,
                                        args.device)
            else:
                fake, stats = run_augment_gan(folder, VARIANTS[model], args.minutes, args.clock, args.samples,
                                              args.seed, args.device, out / ds_name / model, cache_dir)
            fd = frechet_distance(real_features, extractor(fake))
            grid = out / ds_name / f"{model}.png"
            save_grid_png(fake, grid)
            ref = ds["models"].get("dcgan", {}).get("fd")
            ds["models"][model] = {**stats, "fd": fd, "fd_ratio": fd / ref if ref else None,
                                   "grid": str(grid.relative_to(out))}
            log(f"{ds_name}: {model}: FD {fd:.2f} after {stats['kimg']:.1f} kimg ({stats['steps']} steps)")
            write_results(results, out)

    table = markdown_table(results)
    write_bytes_atomic(out / "table.md", (table + "\n").encode())
    print(table)
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
