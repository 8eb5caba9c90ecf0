"""Few-shot digits: does synthetic data from a conditional `fit` help a classifier? (issue 6, "Measure")

For each K (labeled images per class) and seed: draw K images per class from ../shared/data/mnist (the draw
depends on the seed), keep the rest of the folder as the test set, train a conditional augment-gan on the
K×10 images, generate a balanced synthetic set, then train the small CNN of `augment_gan.classifier`
(a) on the real images only and (b) on real + synthetic at each synthetic ratio — the same optimizer steps,
the same recipe (real images get the recipe's real part, synthetic ones its synthetic part) and the same
seed — and test both on the held-out images. The gain is paired per seed (b − a).

    python benchmarks/bench_fewshot.py                               # K = 10, 3 seeds, 4 CPU-min per fit
    python benchmarks/bench_fewshot.py --shots 10,20,50 --ratios 0.25,0.5,0.75
    python benchmarks/bench_fewshot.py --shots 10 --seeds 1 --fit-kimg 0.2 --steps 20 --synthetic 100  # smoke
    python benchmarks/bench_fewshot.py --fit-minutes 24 --out RESULTS --resume  # extend RESULTS' fits to 24 min
    python benchmarks/bench_fewshot.py --fits-from RESULTS --keep-top 0.5       # other synthetic sets, same GANs
    python benchmarks/bench_fewshot.py --gans 3                                 # an ensemble of 3 GANs per draw
    python benchmarks/bench_fewshot.py --fits-from RESULTS --label-filter oracle  # upper bound of label filtering
    python benchmarks/bench_fewshot.py --fits-from RESULTS --real-finish 0.2      # last 20% of steps real only

With --resume, --out is an earlier run's folder: every fit found there continues from its last checkpoint
(`fit --resume`: step, optimizer, RNG, EMA and the budget clock) up to the new budget (a fit not found
there, such as the extra GANs of a larger --gans, starts afresh), and the classifier arms are measured
again; the other settings should be the earlier run's. With --fits-from, nothing is trained: the GANs of
an earlier run's folder (read only) make the synthetic sets of a new --out, so synthesis settings
(--truncation, --keep-top, --source vary, --synthetic, --label-filter) are compared on the same fits.

The synthetic set is written by the product itself, `augment_gan.synth.synth` (or `augment_gan.vary.vary`
with --source vary: variations of the K×10 training images, their class kept), into <run>/synthetic/
(PNG, manifest), and read back with `load_folder` — exactly what a user's pipeline would consume. With
--gans M, M GANs are trained per draw (seeds seed, seed + 1000, ...; run/, run-1/, ...) and each writes an
equal share of the synthetic set (synthetic/, synthetic-1/, ...): a GAN ensemble.

--label-filter drops synthetic images whose class a classifier disputes before the mixed arms train:
`real` asks the draw's first real-only classifier (trained on the K×10 images: a method a user could apply);
`oracle` asks a classifier trained on the held-out test images themselves — not a method, since it has seen
the test set, but an upper bound on what removing off-class samples can gain.

Prints one markdown table to stdout (progress to stderr); writes results.json (rewritten after every seed),
the runs and a synthetic grid per run under --out.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from augment_gan import __version__
from augment_gan.atomic import write_bytes_atomic
from augment_gan.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from augment_gan.classifier import SCHEDULES, accuracy, predict, train_classifier
from augment_gan.config import TrainConfig, load_config_file
from augment_gan.data import ReadOptions, load_folder
from augment_gan.errors import UserError
from augment_gan.grid import tile
from augment_gan.recipes import load_recipe
from augment_gan.synth import SynthConfig, synth
from augment_gan.train import fit
from augment_gan.vary import VaryConfig, vary

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from benchkit import finish, save_results, stats, write_subset  # noqa: E402

RESOLUTION = 32
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repo
SAMPLE_SEED = 1234  # latent seed of the synthetic sets (offset by the run's seed)
CLASSIFIER_SEED_STRIDE = 1000  # classifier seeds of a draw: seed, seed + 1000, ... (the first is the draw's seed)
GAN_SEED_STRIDE = 1000  # GAN seeds of a draw with --gans M: seed, seed + 1000, ...
LABEL_FILTERS = ("none", "real", "oracle")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--shots", default="10", help="comma-separated K: labeled images per class (default 10)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per K: draw, GAN and classifier (default 3)")
    ap.add_argument("--ratios", default="0.25,0.5,0.75",
                    help="comma-separated shares of synthetic images per batch (default 0.25,0.5,0.75)")
    ap.add_argument("--fit-minutes", type=float, default=4.0, help="GAN training budget per run (default 4)")
    ap.add_argument("--fit-kimg", type=float, default=None, help="GAN budget in kimg instead of minutes")
    ap.add_argument("--fit-clock", choices=("wall", "cpu"), default="cpu",
                    help="what --fit-minutes counts: this process's CPU time (default; fair on a shared machine) or wall time")
    ap.add_argument("--fit-config", type=Path, default=None, help="YAML of TrainConfig overrides for fit")
    ap.add_argument("--synthetic", type=int, default=2000, help="synthetic images per run, balanced (default 2000)")
    ap.add_argument("--steps", type=int, default=1000,
                    help="classifier optimizer steps, the same for every arm (default 1000)")
    ap.add_argument("--classifier-seeds", type=int, default=1,
                    help="classifiers trained per arm and draw, accuracy averaged (default 1; the test set is "
                         "the same, so this only averages out training noise)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--recipe", default="standard", help="augmentation recipe for every arm (default standard)")
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "mnist", help="labeled folder (default ../shared/data/mnist)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--device", default="cpu", help="device for fit, sampling and the classifier (default cpu)")
    ap.add_argument("--seed", type=int, default=0, help="first seed (seeds are seed, seed+1, ...)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/fewshot-<time>)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the fits already in --out up to the new budget instead of starting new ones")
    ap.add_argument("--fits-from", type=Path, default=None,
                    help="use the GANs of an earlier run's folder (read only) instead of training new ones")
    ap.add_argument("--source", choices=("synth", "vary"), default="synth",
                    help="synthetic set: `synth` samples (default) or `vary` variations of the training images")
    ap.add_argument("--truncation", type=float, default=1.0, help="synth --truncation (default 1.0)")
    ap.add_argument("--keep-top", type=float, default=None, help="synth --keep-top (default: no rejection)")
    ap.add_argument("--sigma", type=float, default=0.5, help="vary --sigma (default 0.5)")
    ap.add_argument("--gans", type=int, default=1,
                    help="GANs per draw (different seeds), each making an equal share of the synthetic set (default 1)")
    ap.add_argument("--synthetic-schedule", choices=SCHEDULES, default="constant",
                    help="share of synthetic images over the classifier's training: constant (default) or "
                         "linear decay from the ratio to 0")
    ap.add_argument("--real-finish", type=float, default=0.0,
                    help="share of the classifier's last steps trained on real images only (default 0)")
    ap.add_argument("--label-filter", choices=LABEL_FILTERS, default="none",
                    help="drop synthetic images a classifier assigns to another class: `real` (the real-only "
                         "classifier) or `oracle` (trained on the test images: an upper bound, not a method)")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[bench_fewshot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"--{what} must list positive integers, got {text!r}")
    return values


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < 1 for v in values):
        raise UserError(f"--{what} must be in (0, 1), got {text!r}")
    return values


def draw_shots(labels: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: k random images of every class for training, all the others for testing."""
    rng = np.random.default_rng(seed)
    train = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= k:
            raise UserError(f"class {c} has {len(idx)} images; K={k} leaves none to test on")
        train.append(rng.choice(idx, size=k, replace=False))
    train = np.sort(np.concatenate(train))
    return train, np.setdiff1d(np.arange(len(labels)), train)


def synthesize(args: argparse.Namespace, ckpt: Checkpoint, train_folder: Path, n_train: int, out: Path, seed: int,
               classes: list[str], channels: int, n: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Write `n` synthetic images to `out` with `synth` (or `vary` of the `n_train` images in `train_folder`), read
    them back; (uint8 N×H×W×C, labels, summary).

    Labels are the class folders' names, re-indexed into `classes`; `channels` is the real images' (1 or 3).
    """
    if not ckpt.num_classes:
        raise UserError("the GAN is unconditional; the benchmark needs conditional=True")
    if args.source == "vary":
        per_source = max(1, round(n / n_train))
        summary = vary(ckpt, train_folder, out, VaryConfig(n=per_source, sigma=args.sigma, seed=seed,
                                                          device=args.device, progress=False, overwrite=True))
    else:
        summary = synth(ckpt, out, SynthConfig(n=n, seed=seed, truncation=args.truncation,
                                                keep_top=args.keep_top, device=args.device, progress=False,
                                                lanes=1, threads=args.threads, workers=1, overwrite=True))
    options = ReadOptions(resolution=RESOLUTION, channels="gray" if channels == 1 else "rgb")
    data = load_folder(out, options, use_cache=False, workers=1, progress=False)
    if data.labels is None:
        raise UserError(f"{out} has no class folders")
    remap = np.array([classes.index(name) for name in data.classes])
    return np.ascontiguousarray(data.images), remap[np.asarray(data.labels)], summary.to_dict()


def save_png(images: np.ndarray, path: Path) -> None:
    array = tile(images, 10)
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())


def _source_text(results: dict) -> str:
    if results.get("source") == "vary":
        text = f"vary, sigma {results['sigma']:g}"
    else:
        keep = f", keep-top {results['keep_top']:g}" if results.get("keep_top") else ""
        text = f"synth, truncation {results.get('truncation', 1.0):g}{keep}"
    if results.get("gans", 1) > 1:
        text += f", {results['gans']} GANs per draw"
    if results.get("synthetic_schedule") == "linear":
        text += "; synthetic share decays linearly to 0"
    if results.get("real_finish", 0.0):
        text += f"; last {results['real_finish']:.0%} of classifier steps real only"
    if results.get("label_filter", "none") != "none":
        text += f"; {results['label_filter']} label filter"
    return text


def markdown_table(results: dict) -> str:
    ratios = results["ratios"]
    head = ["K / class", "real only"] + [f"+ synthetic {r:g}" for r in ratios] + ["best gain"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, row in results["shots"].items():
        if not row["runs"]:
            continue
        real = stats([run["real_only"] for run in row["runs"]])
        cells = [k, f"{100 * real['mean']:.1f} ± {100 * real['std']:.1f}"]
        gains = {}
        for r in ratios:
            acc = stats([run["mixed"][str(r)] for run in row["runs"]])
            gains[r] = stats([run["mixed"][str(r)] - run["real_only"] for run in row["runs"]])
            cells.append(f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f} ({100 * gains[r]['mean']:+.1f})")
        best = max(ratios, key=lambda r: gains[r]["mean"])
        cells.append(f"**{100 * gains[best]['mean']:+.1f} pp** ± {100 * gains[best]['std']:.1f} at ratio {best:g}")
        lines.append("| " + " | ".join(cells) + " |")
    budget = (f"{results['fit_kimg']:g} kimg" if results["fit_kimg"]
              else f"{results['fit_minutes']:g} {results['fit_config'].get('clock', 'wall')} min")
    n_seeds = max((len(row["runs"]) for row in results["shots"].values()), default=0)
    per_draw = results.get("classifier_seeds", 1)
    averaged = f", each the mean of {per_draw} classifiers" if per_draw > 1 else ""
    notes = [f"Test accuracy (%) on the held-out MNIST images, mean ± std over {n_seeds} seed(s) "
             f"(draw, GAN and classifier{averaged}); gain in percentage points vs real only, paired per seed.",
             f"Small CNN, {results['steps']} steps of batch {results['batch_size']}, recipe {results['recipe']}; "
             f"conditional fit at {RESOLUTION}px for {budget} per run, {results['synthetic']} synthetic images "
             f"({_source_text(results)}); "
             f"{results['threads']} thread(s) on {results['device']}.", "", f"`{results['command']}`"]
    return "\n".join(["\n".join(lines), "", *notes])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = "python benchmarks/bench_fewshot.py " + " ".join(argv)
    try:
        shots, ratios = _ints(args.shots, "shots"), _floats(args.ratios, "ratios")
        counts = (args.seeds, args.classifier_seeds, args.steps, args.threads, args.gans)
        if not 0 <= args.real_finish < 1:
            raise UserError(f"--real-finish must be in [0, 1), got {args.real_finish}")
        if min(counts) < 1 or args.synthetic < 10 * args.gans:
            raise UserError("--seeds, --classifier-seeds, --steps, --threads and --gans must be >= 1, "
                            "--synthetic >= 10 per GAN")
        overrides = load_config_file(args.fit_config) if args.fit_config else {}
        budget = ({"kimg": args.fit_kimg, "minutes": None} if args.fit_kimg
                  else {"minutes": args.fit_minutes, "clock": args.fit_clock})
        base = TrainConfig.from_dict({"resolution": RESOLUTION, "conditional": True, **overrides, **budget})
        if args.fits_from and not (args.fits_from / "results.json").is_file():
            raise UserError(f"--fits-from needs an earlier run's folder; {args.fits_from} has no results.json")
        if args.fits_from:  # the budget and config that matter are the earlier run's
            earlier = json.loads((args.fits_from / "results.json").read_text())
            base = TrainConfig.from_dict(earlier["fit_config"])
            args.fit_minutes, args.fit_kimg = earlier["fit_minutes"], earlier["fit_kimg"]
        load_recipe(args.recipe)  # fail now on a bad recipe name, not after the first GAN
        out = args.out or Path(__file__).resolve().parent / "results" / f"fewshot-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        if args.resume and args.fits_from:
            raise UserError("--resume extends the fits in --out; --fits-from reuses another folder's as they are")
        if args.resume and not (out / "results.json").is_file():
            raise UserError(f"--resume needs an earlier run's --out folder; {out} has no results.json")
        if not args.resume and out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty; choose another --out (or --resume to extend its fits)")
        out.mkdir(parents=True, exist_ok=True)
        return _run(args, shots, ratios, base, out)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def _run(args, shots: list[int], ratios: list[float], base: TrainConfig, out: Path) -> int:
    torch.set_num_threads(args.threads)
    cache_dir = out / "cache"
    data = load_folder(args.data, ReadOptions(resolution=RESOLUTION), cache_dir=cache_dir, progress=False)
    if data.labels is None or len(data.classes) < 2:
        raise UserError(f"{args.data} needs class subfolders")
    images, labels = np.ascontiguousarray(data.images), np.asarray(data.labels)
    log(f"{len(images)} images, {len(data.classes)} classes, {data.channels} channel(s)")
    results = {"command": args.command, "started": _dt.datetime.now().isoformat(timespec="seconds"),
               "package_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
               "data": str(data.root), "ratios": ratios, "steps": args.steps, "batch_size": args.batch_size,
               "recipe": args.recipe, "synthetic": args.synthetic, "fit_minutes": args.fit_minutes,
               "fit_kimg": args.fit_kimg, "fit_config": base.to_dict(), "threads": args.threads,
               "fits_from": str(args.fits_from) if args.fits_from else None, "source": args.source,
               "truncation": args.truncation, "keep_top": args.keep_top, "sigma": args.sigma, "gans": args.gans,
               "label_filter": args.label_filter, "synthetic_schedule": args.synthetic_schedule,
               "real_finish": args.real_finish,
               "device": args.device, "classifier_seeds": args.classifier_seeds, "shots": {str(k): {"runs": []} for k in shots}}

    for k in shots:
        for seed in range(args.seed, args.seed + args.seeds):
            tag = f"k{k}-seed{seed}"
            train_idx, test_idx = draw_shots(labels, k, seed)
            folder = out / tag / "train"
            write_subset(data.root, [data.files[i] for i in train_idx], folder)

            gans, parts = [], []
            for j in range(args.gans):
                suffix = f"-{j}" if j else ""
                t0 = time.monotonic()
                if args.fits_from:
                    resume = False
                    # A missing run is resolve_checkpoint's one-line UserError.
                    ckpt_path = resolve_checkpoint(args.fits_from / tag / f"run{suffix}")
                    log(f"{tag}: GAN of {ckpt_path}")
                else:
                    run_dir = out / tag / f"run{suffix}"
                    resume = args.resume and (run_dir / "checkpoints").is_dir()
                    log(f"{tag}: {'resume the fit' if resume else 'fit'} of GAN {j} on {len(train_idx)} images")
                    ckpt_path = fit(folder, base.replace(seed=seed + GAN_SEED_STRIDE * j), run_dir, device=args.device,
                                    resume=resume, cache_dir=cache_dir, progress=False)
                fit_s = time.monotonic() - t0
                ckpt = load_checkpoint(ckpt_path, device=args.device)
                meta = ckpt.meta  # what fit recorded: step, kimg, elapsed_s
                share = args.synthetic // args.gans + (j < args.synthetic % args.gans)
                parts.append(synthesize(args, ckpt, folder, len(train_idx), out / tag / f"synthetic{suffix}",
                                        SAMPLE_SEED + seed, data.classes, data.channels, share))
                gans.append({"checkpoint": str(ckpt_path), "fit_seconds": round(fit_s, 1), "fit_kimg": meta.kimg,
                             "fit_budget_s": meta.elapsed_s, "fit_step": meta.step, "resumed": resume,
                             "synthetic_summary": parts[-1][2]})
            synth_images = np.concatenate([part[0] for part in parts])
            synth_labels = np.concatenate([part[1] for part in parts])
            log(f"{tag}: {len(synth_images)} synthetic images ({args.source}, {args.gans} GAN(s))")
            rows = [np.flatnonzero(synth_labels == c)[:10] for c in range(len(data.classes))]
            save_png(synth_images[np.concatenate(rows)], out / tag / "synthetic.png")  # up to 10 per class

            x_tr, y_tr, x_te, y_te = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
            common = dict(steps=args.steps, batch_size=args.batch_size, num_classes=len(data.classes),
                          device=args.device, recipe=load_recipe(args.recipe, part="real"))
            synthetic_recipe = load_recipe(args.recipe, part="synthetic")  # reseeded by every train_classifier
            cls_seeds = [seed + CLASSIFIER_SEED_STRIDE * j for j in range(args.classifier_seeds)]
            real_models = [train_classifier(x_tr, y_tr, seed=cs, **common) for cs in cls_seeds]
            real_runs = [accuracy(model, x_te, y_te) for model in real_models]
            real_only = float(np.mean(real_runs))
            log(f"{tag}: real only {real_only:.2%} ({', '.join(f'{a:.1%}' for a in real_runs)})")
            kept_share = 1.0
            if args.label_filter != "none":
                judge = (real_models[0] if args.label_filter == "real" else
                         train_classifier(x_te, y_te, seed=seed, **common))  # oracle: has seen the test images
                keep = predict(judge, synth_images) == synth_labels
                kept_share = float(keep.mean())
                if not keep.any():
                    raise UserError(f"{tag}: the {args.label_filter} label filter rejected every synthetic image")
                synth_images, synth_labels = synth_images[keep], synth_labels[keep]
                log(f"{tag}: {args.label_filter} label filter kept {keep.sum()} of {len(keep)} ({kept_share:.1%})")
            mixed, mixed_runs = {}, {}
            for r in ratios:
                mixed_runs[str(r)] = [accuracy(train_classifier(
                    x_tr, y_tr, extra=(synth_images, synth_labels), synthetic_ratio=r, seed=cs,
                    extra_recipe=synthetic_recipe, synthetic_schedule=args.synthetic_schedule,
                    real_finish=args.real_finish, **common), x_te, y_te) for cs in cls_seeds]
                mixed[str(r)] = float(np.mean(mixed_runs[str(r)]))
                log(f"{tag}: ratio {r:g}: {mixed[str(r)]:.2%} ({100 * (mixed[str(r)] - real_only):+.2f} pp; "
                    f"{', '.join(f'{a:.1%}' for a in mixed_runs[str(r)])})")
            first = gans[0]  # the top-level fit fields are GAN 0's (the only one without --gans)
            results["shots"][str(k)]["runs"].append({
                "seed": seed, "train_images": len(train_idx), "test_images": len(test_idx),
                "fit_seconds": first["fit_seconds"], "fit_kimg": first["fit_kimg"], "resumed": first["resumed"],
                "fit_budget_s": first["fit_budget_s"], "checkpoint": first["checkpoint"], "fit_step": first["fit_step"],
                "gans": gans, "synthetic_images": len(synth_images), "label_filter_kept": kept_share,
                "synthetic_summary": first["synthetic_summary"],
                "classifier_seeds": cls_seeds, "real_only": real_only, "mixed": mixed,
                "real_only_runs": real_runs, "mixed_runs": mixed_runs})
            save_results(out, results)

    table = markdown_table(results)
    finish(out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
