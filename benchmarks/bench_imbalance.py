"""Long-tailed digits: does rebalancing with synthetic images beat oversampling? (issue "Rebalance long-tailed folders")

For each seed: draw a long-tailed training set from ../shared/data/mnist — 400, 200, 100, 75, 50, 35, 20, 10,
6 and 4 images of digits 0–9 (imbalance ratio 100), chosen by the seed — and a balanced test set of 200 other
images of every digit. The training set is written as a real ImageFolder (<out>/seed<S>/train/<class>/) because
`fit` and `vary` read folders. One conditional `fit` per seed serves every arm that needs a GAN. Each arm then
trains the small CNN of `augment_gan.classifier` with the `standard` recipe, the same optimizer steps, batch
size and classifier seed, and is tested on the balanced set:

    none            the long-tailed images as they are
    oversample      random oversampling to balance: every class's images repeated up to the largest class's
                    count (the baseline every other arm is compared with, paired per seed)
    smote           imbalanced-learn's SMOTE on the flattened pixels, to balance; trained like `none`
    synth-balance   real + `synth(run, out, balance=True)`: N - n_c generated images of class c
    interp-balance  real + `vary(run, train, out, interpolate=True, balance=True)`: latent interpolations
    synth-half      synthetic images fill half of each class's shortfall, oversampling the other half
    oversample-synth  `oversample`, plus the synth-balance images as 25% of every batch
    oversample-checked  as oversample-synth, with only the synth-balance images that a second classifier
                    (trained like `oversample`, another seed) assigns to the class they were drawn for

The synthetic-balance arms sample the union of real and synthetic images uniformly (it is balanced already):
each batch holds round(64 · S / (R + S)) synthetic images (`ADDED_SHARE` for the two on top of oversampling).
Synthetic images always get the recipe's synthetic part, real ones its real part, as in bench_fewshot.

    python benchmarks/bench_imbalance.py                                  # 3 seeds, 5 wall-minutes per fit
    python benchmarks/bench_imbalance.py --arms none,oversample,smote     # no GAN
    python benchmarks/bench_imbalance.py --fits-from RESULTS --arms oversample,oversample-checked  # same GANs
    python benchmarks/bench_imbalance.py --seeds 0 --fit-kimg 0.1 --classifier-steps 20 \\
        --counts 8,6,5,4,3,3,2,2,2,2 --test-per-class 4 --data-root DIGITS   # smoke test on a small folder

Reports per arm and seed the ACSA (average class-specific accuracy: the mean per-class recall), macro-F1, the
geometric mean of the per-class recalls and the mean recall of the five rarest classes; then mean ± std over
seeds and the paired difference to `oversample`. For the synthetic sets: a sample grid of each of the three
rarest classes (real training images in the first row) and the share of synthetic images per class that copy a
training image (`augment_gan.metrics.NearestReal` in the pixel space of `synth --dedup`).

Prints one markdown table to stdout (progress to stderr); writes results.json (rewritten after every seed),
table.md, the training folders, runs, synthetic sets and grids under --out. `smote` needs the `bench` extra
(pip install imbalanced-learn); without it, or while synth/vary lack their balance options, those arms are
skipped with a message.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import io
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from augment_gan import __version__
from augment_gan.atomic import write_bytes_atomic
from augment_gan.checkpoint import load_checkpoint
from augment_gan.classifier import predict, train_classifier
from augment_gan.config import TrainConfig
from augment_gan.data import ReadOptions, load_folder
from augment_gan.errors import UserError
from augment_gan.features import pixel_extractor
from augment_gan.grid import tile
from augment_gan.measure import oversample_indices  # random oversampling: augment's balanced baseline
from augment_gan.metrics import NearestReal
from augment_gan.recipes import load_recipe
from augment_gan.synth import SynthConfig, synth
from augment_gan.train import fit
from augment_gan.vary import VaryConfig, vary

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from benchkit import choices, finish, numbers, save_results, stats, write_subset  # noqa: E402

RESOLUTION = 32  # the GAN's; the 28 px digits are read at 32 px (`load_folder`) so every arm trains at one size
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repo
COUNTS = (400, 200, 100, 75, 50, 35, 20, 10, 6, 4)
"""Training images of classes 0-9: a long tail with imbalance ratio 400 / 4 = 100, the ratio of the imbalanced
MNIST in Dablain et al. 2022 (DeepSMOTE), on 1/40 of their data so that a CPU fit sees every image often."""
TEST_PER_CLASS = 200
RECIPE = "standard"
BASELINE = "oversample"
ARMS = ("none", "oversample", "smote", "synth-balance", "interp-balance", "synth-half", "oversample-synth",
        "oversample-checked")
SOURCES = {"synth-balance": "synth", "synth-half": "synth", "interp-balance": "interp", "oversample-synth": "synth",
           "oversample-checked": "synth"}
"""Which synthetic set an arm draws on: the `synth` arms share one `synth --balance` output per seed."""
ADDED_SHARE = {"oversample-synth": 0.25, "oversample-checked": 0.25}
"""Arms whose synthetic images come on top of a balanced real pool, at this share of every batch:
`oversample-synth` = `oversample` + 25% `synth --balance` images; `oversample-checked` the same with the
images `check_synthetic` keeps."""
CHECK_SEED = 100
"""`oversample-checked`: the checking classifier's seed is the run's seed + this (not the arms' own seed)."""
METRICS = {"acsa": "ACSA", "macro_f1": "macro-F1", "g_mean": "G-mean", "rare_recall": "recall, 5 rarest"}
RARE = 5  # classes averaged in `rare_recall`
GRID_CLASSES = 3  # rarest classes shown in the sample grids
SAMPLE_SEED = 1234  # latent seed of the synthetic sets (offset by the run's seed), as in bench_fewshot
REFERENCE = (("SMOTE", 87.98), ("BAGAN", 93.06), ("GAMO", 95.52), ("DeepSMOTE", 96.09))
"""ACSA (%) on imbalanced MNIST, ratio 100, as reported by Dablain et al. 2022 (DeepSMOTE, IEEE TNNLS)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: draw, GAN and classifiers (default 0,1,2)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms (default all: {','.join(ARMS)})")
    ap.add_argument("--fit-minutes", type=float, default=5.0, help="GAN training budget per seed (default 5)")
    ap.add_argument("--fit-clock", choices=("wall", "cpu"), default="wall",
                    help="what --fit-minutes counts: wall time (default; run the benchmark alone) or CPU time")
    ap.add_argument("--fit-kimg", type=float, default=None, help="GAN budget in kimg instead of minutes")
    ap.add_argument("--classifier-steps", type=int, default=1000,
                    help="optimizer steps of every classifier (default 1000, as bench_fewshot)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)),
                    help="comma-separated training images per class, in class order (default 400,...,4)")
    ap.add_argument("--test-per-class", type=int, default=TEST_PER_CLASS,
                    help=f"balanced test images per class (default {TEST_PER_CLASS})")
    ap.add_argument("--data-root", type=Path, default=SHARED_DATA / "mnist",
                    help="labeled folder to draw from (default ../shared/data/mnist)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--device", default="cpu", help="device for fit, sampling and the classifiers (default cpu)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default benchmarks/results/<time>-imbalance)")
    ap.add_argument("--fits-from", type=Path, default=None,
                    help="an earlier run's --out: use its fits (read only) instead of training new ones, to compare "
                         "arms on the same GANs; the draw settings must be the earlier run's")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[bench_imbalance {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Metrics on a confusion matrix (rows: true class, columns: predicted class).


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 K×K: entry (t, p) counts test images of class t predicted as p."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def recalls(cm: np.ndarray) -> np.ndarray:
    """Per-class recall (float K); every class needs test images."""
    support = cm.sum(1)
    if (support == 0).any():
        raise UserError(f"class(es) {np.flatnonzero(support == 0).tolist()} have no test images")
    return np.diag(cm) / support


def acsa(cm: np.ndarray) -> float:
    """Average class-specific accuracy: the unweighted mean of the per-class recalls (balanced accuracy)."""
    return float(recalls(cm).mean())


def g_mean(cm: np.ndarray) -> float:
    """Geometric mean of the per-class recalls: 0 as soon as one class is never recognised."""
    r = recalls(cm)
    return 0.0 if (r == 0).any() else float(np.exp(np.log(r).mean()))


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN); 0 for a class never predicted nor right."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # (TP + FP) + (TP + FN)
    return float(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0).mean())


def rarest(counts: list[int], k: int) -> list[int]:
    """The k classes with the fewest training images, rarest first (ties: the later class first)."""
    return np.lexsort((-np.arange(len(counts)), np.asarray(counts)))[:k].tolist()


def scores(cm: np.ndarray, rare: list[int]) -> dict:
    r = recalls(cm)
    return {"acsa": acsa(cm), "macro_f1": macro_f1(cm), "g_mean": g_mean(cm),
            "rare_recall": float(r[rare].mean()), "recall": r.tolist()}


# ----------------------------------------------------------------------------------------------------
# The long-tailed draw and the resampling arms.


def draw_longtail(labels: np.ndarray, counts: list[int], test_per_class: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: counts[c] random images of class c for training, test_per_class others for testing."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c, n in enumerate(counts):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < n + test_per_class:
            raise UserError(f"class {c} has {len(idx)} images; {n} to train and {test_per_class} to test need more")
        train.append(idx[:n])
        test.append(idx[n:n + test_per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def import_smote():
    """imbalanced-learn's SMOTE class, imported only when the `smote` arm runs (the `bench` extra)."""
    try:
        from imblearn.over_sampling import SMOTE
    except ImportError:
        raise UserError("the smote arm needs imbalanced-learn: pip install imbalanced-learn "
                        "(or pip install -e '.[bench]')") from None
    return SMOTE


def smote_resample(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every class SMOTE-d up to the largest one's count, on flattened pixels; uint8 N×H×W×C and labels."""
    counts = np.bincount(labels)
    fewest = int(counts[counts > 0].min())
    if fewest < 2:
        raise UserError("SMOTE needs at least 2 training images in every class")
    # imbalanced-learn's default of 5 neighbours needs 6 images per class; one k serves every class.
    sampler = import_smote()(k_neighbors=min(5, fewest - 1), random_state=seed)
    x, y = sampler.fit_resample(images.reshape(len(images), -1).astype(np.float32), labels)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, *images.shape[1:])
    return x, np.asarray(y, np.int64)


def missing_api(source: str) -> str | None:
    """Why this version of the package cannot make a synthetic set (`synth` or `interp`), or None."""
    config, needed = (SynthConfig, ("balance",)) if source == "synth" else (VaryConfig, ("interpolate", "balance"))
    fields = {f.name for f in dataclasses.fields(config)}
    absent = [n for n in needed if n not in fields]
    return f"this augment_gan's {config.__name__} has no {' / '.join(absent)} option" if absent else None


def arm_pools(arm: str, x: np.ndarray, y: np.ndarray, seed: int, synthetic: dict
              ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(real images, their labels, synthetic (images, labels) or None) an arm trains on; `synthetic` maps a
    source (`SOURCES`) to its images and labels, and "checked" to the synth images `check_synthetic` kept."""
    counts = np.bincount(y)
    top = int(counts.max())
    if arm == "none":
        return x, y, None
    if arm == "oversample":
        idx = oversample_indices(y, [top] * len(counts), seed)
        return x[idx], y[idx], None
    if arm == "smote":
        return (*smote_resample(x, y, seed), None)
    if arm in ("synth-balance", "interp-balance"):
        return x, y, synthetic[SOURCES[arm]]
    if arm in ("oversample-synth", "oversample-checked"):
        idx = oversample_indices(y, [top] * len(counts), seed)
        return x[idx], y[idx], synthetic["synth" if arm == "oversample-synth" else "checked"]
    if arm == "synth-half":
        sx, sy = synthetic["synth"]
        # Half of each shortfall from the GAN (its first images: sample i depends only on i), the rest oversampled.
        take = [min((top - n) // 2, int((sy == c).sum())) for c, n in enumerate(counts)]
        keep = np.concatenate([np.flatnonzero(sy == c)[:t] for c, t in enumerate(take)])
        idx = oversample_indices(y, [top - t for t in take], seed)
        return x[idx], y[idx], (sx[keep], sy[keep])
    raise AssertionError(arm)


def check_synthetic(x: np.ndarray, y: np.ndarray, sx: np.ndarray, sy: np.ndarray, common: dict) -> np.ndarray:
    """Mask of the synthetic images (sx, sy) that a classifier trained on the `oversample` arm's pool, but with
    seed + CHECK_SEED, assigns to their own class: GAN samples that drifted into another class are left out."""
    xo, yo, _ = arm_pools("oversample", x, y, common["seed"], {})
    model = train_classifier(xo, yo, **{**common, "seed": common["seed"] + CHECK_SEED})
    return predict(model, sx) == sy


# ----------------------------------------------------------------------------------------------------
# Synthetic sets: generation, memorisation and grids.


def make_synthetic(source: str, ckpt, train_folder: Path, out: Path, seed: int, args, classes: list[str],
                   channels: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Write the seed's balancing set with the product (`synth` or `vary`), read it back like a user would;
    (uint8 N×H×W×C, labels indexed into `classes`, summary)."""
    if source == "synth":
        summary = synth(ckpt, out, SynthConfig(balance=True, seed=SAMPLE_SEED + seed, device=args.device,
                                                progress=False, lanes=1, threads=args.threads, workers=1,
                                                overwrite=True))
    else:
        summary = vary(ckpt, train_folder, out, VaryConfig(interpolate=True, balance=True, seed=SAMPLE_SEED + seed,
                                                           device=args.device, progress=False, overwrite=True))
    data = load_folder(out, ReadOptions(resolution=RESOLUTION, channels="gray" if channels == 1 else "rgb"),
                       use_cache=False, workers=1, progress=False)
    if data.labels is None:
        raise UserError(f"{out} has no class folders")
    remap = np.array([classes.index(name) for name in data.classes])
    return np.ascontiguousarray(data.images), remap[np.asarray(data.labels)], summary.to_dict()


def memorisation_by_class(real: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray, classes: list[str]) -> dict:
    """Share of each class's synthetic images that copy a training image: the nearest training image (any class)
    is within the threshold of `NearestReal` (the 1st percentile of the training images' own nearest-neighbour
    distances), in the 16×16 pixel space that `synth --dedup` uses."""
    extractor = pixel_extractor()
    index = NearestReal(torch.from_numpy(extractor(real)))
    distance, _ = index.nearest(torch.from_numpy(extractor(fake)))
    flagged = np.asarray(index.is_copy(distance))
    share = {name: (float(flagged[fake_labels == c].mean()) if (fake_labels == c).any() else None)
             for c, name in enumerate(classes)}
    return {"feature": extractor.name, "threshold": index.threshold, "overall": float(flagged.mean()),
            "per_class": share}


def save_png(images: np.ndarray, path: Path, ncols: int = 10) -> None:
    array = tile(images, ncols)
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())


def class_grid(real: np.ndarray, fake: np.ndarray, path: Path, ncols: int = 10, fake_rows: int = 3) -> None:
    """First row: up to `ncols` real images (white tiles fill the row); then up to `fake_rows` rows of synthetic."""
    blank = np.full((1, *real.shape[1:]), 255, np.uint8)
    first = np.concatenate([real[:ncols], *[blank] * max(0, ncols - len(real))])
    save_png(np.concatenate([first, fake[:ncols * fake_rows]]), path, ncols)


# ----------------------------------------------------------------------------------------------------
# Summary and table.


def summarise(results: dict) -> dict:
    """Mean ± std over seeds of every metric per arm, and of the paired difference to the baseline."""
    runs = results["runs"]
    summary, delta = {}, {}
    for arm in results["arms"]:
        summary[arm] = {m: stats([run["arms"][arm][m] for run in runs]) for m in METRICS}
        if BASELINE in results["arms"]:
            delta[arm] = {m: stats([run["arms"][arm][m] - run["arms"][BASELINE][m] for run in runs]) for m in METRICS}
    return {"summary": summary, "vs_baseline": delta}


def _pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _pp(s: dict) -> str:
    return f"{100 * s['mean']:+.1f} ± {100 * s['std']:.1f}"


def markdown_table(results: dict) -> str:
    arms, runs, delta = results["arms"], results["runs"], results["vs_baseline"]
    head = ["arm", *METRICS.values(), f"Δ ACSA vs {BASELINE}", f"Δ rarest-5 recall vs {BASELINE}"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for arm in arms:
        name = f"**{arm}** (baseline)" if arm == BASELINE else arm
        cells = [_pct(results["summary"][arm][m]) for m in METRICS]
        cells += [_pp(delta[arm][m]) if arm in delta and arm != BASELINE else "—" for m in ("acsa", "rare_recall")]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    seeds = [run["seed"] for run in runs]
    budget = (f"{results['fit_kimg']:g} kimg" if results["fit_kimg"]
              else f"{results['fit_minutes']:g} {results['fit_clock']}-minutes")
    rare = ", ".join(results["classes"][c] for c in sorted(results["rare"]))
    notes = (f"Scores (%) on the balanced test set ({results['test_per_class']} images per class), mean ± std over "
             f"seeds {', '.join(map(str, seeds))}; Δ in percentage points, paired per seed. Training images per "
             f"class: {', '.join(map(str, results['counts']))} (the five rarest: {rare}). Small CNN, "
             f"{results['classifier_steps']} steps of batch {results['batch_size']}, recipe {RECIPE}; "
             + (f"the conditional fits of {results['fits_from']}; " if results.get("fits_from") else
                f"conditional fit at {RESOLUTION}px for {budget} per seed; " if any(r["fit"] for r in runs) else "")
             + f"{results['threads']} thread(s) on {results['device']}.")
    out = ["\n".join(lines), "", notes]
    if BASELINE in arms and len(runs) > 1:
        rows = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
        for arm in arms:
            if arm != BASELINE:
                rows.append(f"| {arm} | " + " | ".join(
                    f"{100 * (run['arms'][arm]['acsa'] - run['arms'][BASELINE]['acsa']):+.1f}" for run in runs) + " |")
        out += ["", f"Δ ACSA vs {BASELINE} per seed (pp):", "", "\n".join(rows)]
    sets = sorted({name for run in runs for name in run["synthetic"]})
    if sets:
        shown = [c for c in range(len(results["classes"]))
                 if any(run["synthetic"][s]["memorisation"]["per_class"][results["classes"][c]] is not None
                        for run in runs for s in run["synthetic"])]
        rows = ["| synthetic set | images | " + " | ".join(f"class {results['classes'][c]}" for c in shown) + " |",
                "|---|---:|" + "---:|" * len(shown)]
        for s in sets:
            have = [run["synthetic"][s] for run in runs if s in run["synthetic"]]
            cells = []
            for c in shown:
                shares = [h["memorisation"]["per_class"][results["classes"][c]] for h in have]
                shares = [v for v in shares if v is not None]
                cells.append(f"{100 * np.mean(shares):.0f}%" if shares else "—")
            images = int(np.mean([sum(h["per_class"]) for h in have]))
            rows.append(f"| {s} | {images} | " + " | ".join(cells) + " |")
        head = ("Memorisation: share of each class's synthetic images whose nearest training image (16×16 pixels) "
                "is closer than 99% of training images are to each other (`NearestReal`), mean over seeds:")
        out += ["", head, "", "\n".join(rows)]
        checked = [(s["checked"]["kept_per_class"], s["per_class"]) for run in runs
                   if "checked" in (s := run["synthetic"].get("synth-balance", {}))]
        if checked:
            share = [np.mean([kept[c] / made[c] for kept, made in checked]) for c in shown]
            share = [f"class {results['classes'][c]} {100 * v:.0f}%" for c, v in zip(shown, share)]
            out += ["", "oversample-checked: share of each class's synth-balance images the checking classifier "
                        "assigns to their class, mean over seeds: " + ", ".join(share) + "."]
    rows = ["| method (Dablain et al. 2022) | ACSA |", "|---|---:|"] + [f"| {m} | {v:.2f} |" for m, v in REFERENCE]
    head = ("Published for reference: imbalanced MNIST, ratio 100, ResNet-18 on about 40× more training images "
            "(DeepSMOTE, IEEE TNNLS 2022). Compare the ordering of methods only, not the numbers:")
    out += ["", head, "", "\n".join(rows)]
    if results["skipped"]:
        out += ["", "Skipped: " + "; ".join(f"{arm} ({why})" for arm, why in results["skipped"].items()) + "."]
    out += ["", f"`{results['command']}`"]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# The benchmark.


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = "python benchmarks/bench_imbalance.py " + " ".join(argv)
    try:
        seeds = numbers(args.seeds, "seeds")
        counts = numbers(args.counts, "counts", minimum=1)
        arms = choices(args.arms, "arm", ARMS)
        if min(args.classifier_steps, args.threads, args.test_per_class) < 1 or args.batch_size < 2:
            raise UserError("--classifier-steps, --threads and --test-per-class must be >= 1, --batch-size >= 2")
        budget = ({"kimg": args.fit_kimg, "minutes": None} if args.fit_kimg
                  else {"minutes": args.fit_minutes, "clock": args.fit_clock})
        base = TrainConfig.from_dict({"resolution": RESOLUTION, "conditional": True, **budget})
        load_recipe(RECIPE)  # fail now, not after the first GAN
        out = args.out or Path(__file__).resolve().parent / "results" / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-imbalance"
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty; choose another --out")

        skipped = {}
        for arm in arms:  # say what cannot run before any work, and run the rest
            try:
                if arm == "smote":
                    import_smote()
                elif arm in SOURCES and missing_api(SOURCES[arm]):
                    raise UserError(missing_api(SOURCES[arm]))
            except UserError as exc:
                skipped[arm] = str(exc)
                log(f"skipping the {arm} arm: {exc}")
        arms = [a for a in arms if a not in skipped]
        if not arms:
            raise UserError("no arm left to run: " + "; ".join(f"{a}: {w}" for a, w in skipped.items()))
        out.mkdir(parents=True, exist_ok=True)
        return _run(args, seeds, counts, arms, skipped, base, out)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def _run(args, seeds: list[int], counts: list[int], arms: list[str], skipped: dict, base: TrainConfig,
         out: Path) -> int:
    torch.set_num_threads(args.threads)
    cache_dir = out / "cache"
    data = load_folder(args.data_root, ReadOptions(resolution=RESOLUTION), cache_dir=cache_dir, progress=False)
    if data.labels is None or len(data.classes) < 2:
        raise UserError(f"{args.data_root} needs class subfolders")
    if len(counts) != len(data.classes):
        raise UserError(f"--counts lists {len(counts)} numbers but {args.data_root} has {len(data.classes)} classes")
    images, labels, classes = np.ascontiguousarray(data.images), np.asarray(data.labels), data.classes
    rare = rarest(counts, RARE)
    log(f"{len(images)} images, {len(classes)} classes; arms {', '.join(arms)}")
    sources = sorted({SOURCES[a] for a in arms if a in SOURCES})
    results = {"command": args.command, "started": _dt.datetime.now().isoformat(timespec="seconds"),
               "package_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
               "data": str(data.root), "classes": classes, "counts": counts, "test_per_class": args.test_per_class,
               "rare": rare, "arms": arms, "baseline": BASELINE, "skipped": skipped, "recipe": RECIPE,
               "classifier_steps": args.classifier_steps, "batch_size": args.batch_size,
               "fit_minutes": args.fit_minutes, "fit_clock": args.fit_clock, "fit_kimg": args.fit_kimg,
               "fits_from": str(args.fits_from) if args.fits_from else None,
               "fit_config": base.to_dict(), "threads": args.threads, "device": args.device, "runs": []}
    recipe, synthetic_recipe = load_recipe(RECIPE, part="real"), load_recipe(RECIPE, part="synthetic")

    for seed in seeds:
        tag = f"seed{seed}"
        train_idx, test_idx = draw_longtail(labels, counts, args.test_per_class, seed)
        folder = out / tag / "train"
        write_subset(data.root, [data.files[i] for i in train_idx], folder)
        x_tr, y_tr, x_te, y_te = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
        run = {"seed": seed, "train_images": len(train_idx), "test_images": len(test_idx), "fit": None,
               "synthetic": {}, "arms": {}}

        # One conditional GAN per seed, shared by the arms that need one.
        synthetic = {}
        if sources:
            t0 = time.monotonic()
            if args.fits_from is not None:
                ckpt_path = args.fits_from / tag / "run"
                if not ckpt_path.is_dir():
                    raise UserError(f"--fits-from: {ckpt_path} is missing")
            else:
                log(f"{tag}: fit on {len(train_idx)} images")
                ckpt_path = fit(folder, base.replace(seed=seed), out / tag / "run", device=args.device,
                                cache_dir=cache_dir, progress=False)
            ckpt = load_checkpoint(ckpt_path, device=args.device)
            run["fit"] = {"checkpoint": str(ckpt.path), "seconds": round(time.monotonic() - t0, 1),
                          "kimg": ckpt.meta.kimg, "step": ckpt.meta.step, "budget_s": ckpt.meta.elapsed_s}
            for source in sources:
                name = {"synth": "synth-balance", "interp": "interp-balance"}[source]
                t0 = time.monotonic()
                sx, sy, summary = make_synthetic(source, ckpt, folder, out / tag / name, seed, args, classes,
                                                 data.channels)
                synthetic[source] = (sx, sy)
                per_class = np.bincount(sy, minlength=len(classes)).tolist()
                shortfall = [max(counts) - n for n in counts]
                if per_class != shortfall:
                    log(f"{tag}: warning: {name} wrote {per_class} images per class, the shortfall is {shortfall}")
                run["synthetic"][name] = {"per_class": per_class, "seconds": round(time.monotonic() - t0, 1),
                                          "summary": summary,
                                          "memorisation": memorisation_by_class(x_tr, sx, sy, classes)}
                for c in rare[:GRID_CLASSES]:
                    if (sy == c).any():
                        class_grid(x_tr[y_tr == c], sx[sy == c], out / tag / "grids" / f"{name}-class{classes[c]}.png")
                log(f"{tag}: {name}: {len(sx)} images in {run['synthetic'][name]['seconds']:.0f} s, "
                    f"{run['synthetic'][name]['memorisation']['overall']:.1%} copies")

        # The arms: same classifier seed, steps, batch size and recipe; only the training pool differs.
        common = {"steps": args.classifier_steps, "batch_size": args.batch_size, "num_classes": len(classes),
                  "device": args.device, "seed": seed, "recipe": recipe}
        if "oversample-checked" in arms:
            sx, sy = synthetic["synth"]
            keep = check_synthetic(x_tr, y_tr, sx, sy, common)
            synthetic["checked"] = (sx[keep], sy[keep])
            run["synthetic"]["synth-balance"]["checked"] = {
                "kept_per_class": np.bincount(sy[keep], minlength=len(classes)).tolist(),
                "seed": seed + CHECK_SEED}
            log(f"{tag}: the checking classifier keeps {keep.sum()} of {len(sx)} synth-balance images")
        for arm in arms:
            t0 = time.monotonic()
            x, y, extra = arm_pools(arm, x_tr, y_tr, seed, synthetic)
            ratio = 0.0
            if extra is not None and len(extra[0]):
                # Uniform over the union, up to rounding; or a fixed share on top of a balanced real pool.
                ratio = ADDED_SHARE.get(arm, len(extra[0]) / (len(x) + len(extra[0])))
                model = train_classifier(x, y, extra=extra, synthetic_ratio=ratio,
                                         extra_recipe=synthetic_recipe, **common)
            else:
                model = train_classifier(x, y, **common)
            cm = confusion(y_te, predict(model, x_te), len(classes))
            run["arms"][arm] = {**scores(cm, rare), "confusion": cm.tolist(), "real_pool": len(x),
                                "synthetic_images": 0 if extra is None else len(extra[0]), "synthetic_ratio": ratio,
                                "synthetic_per_batch": round(ratio * args.batch_size),  # what train_classifier draws
                                "seconds": round(time.monotonic() - t0, 1)}
            r = run["arms"][arm]
            log(f"{tag}: {arm}: ACSA {r['acsa']:.1%}, macro-F1 {r['macro_f1']:.1%}, G-mean {r['g_mean']:.1%}, "
                f"rarest-5 recall {r['rare_recall']:.1%} ({r['seconds']:.0f} s)")
        results["runs"].append(run)
        results.update(summarise(results))
        save_results(out, results)

    table = markdown_table(results)
    finish(out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
