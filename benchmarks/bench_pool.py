"""Few labels, many unlabeled images: does a GAN fitted on the whole pool help? (issue "From an unlabeled folder")

For each seed: from ../shared/data/mnist draw 10 labeled images per digit and a disjoint balanced test set of 100
per digit; every image not in the test set (about 5,000, the labeled ones included) is the unlabeled pool,
written flat (no class folders, numbered file names) so nothing but the labeled folder carries a label. Two
5-wall-minute fits per seed, one after the other, each alone on the machine:

    pool run     `fit POOL` (unconditional): G, D and E see every pool image
    labels run   `fit POOL --labels LABELED`: pseudo-labels from a classifier trained on the labeled folder
                 (confidence 0.9), a class-conditional run on the labeled + confidently labelled images

Synthetic sets, written by the product and read back like a user's pipeline would (`--synthetic` images each):

    vary         `vary POOL_RUN LABELED --n K`: K variations of every labeled image, its class kept
    label-with   `synth POOL_RUN --label-with LABELED`: pool-run samples labelled by a classifier trained on the
                 labeled folder, confident ones kept
    labels-fit   `synth LABELS_RUN`: the conditional run's balanced samples

Arms: the small CNN of `augment_gan.classifier`, the same steps, batch size, `standard` recipe and classifier
seed, tested on the balanced test set:

    real                 the 100 labeled images only (the baseline, paired per seed)
    <set>@<r>            real + a synthetic set as share r of every batch (its recipe's synthetic part)
    self-train           the reference a user could pick instead: the `real` classifier labels the pool, images
                         at confidence >= 0.9 join the labeled ones as real training images (one round)
    self-train+<set>     self-train plus a synthetic set at `--combine-ratio` of every batch

    python benchmarks/bench_pool.py                                  # 3 seeds, 5 wall-minutes per fit
    python benchmarks/bench_pool.py --fits-from RESULTS --sets labels-fit --synthetic 10000 --ratios 0.5,0.75
    python benchmarks/bench_pool.py --seeds 0 --fit-kimg 0.05 --classifier-steps 20 --synthetic 40 \\
        --labeled-per-class 2 --test-per-class 3 --data-root DIGITS  # smoke test on a small folder

Also reported per seed: the pseudo-labels' accuracy (self-training's and the labels run's, against the true
digits the benchmark knows), and a linear probe of the pool run's D features — trained on the 100 labeled
images, tested on the test set — next to a randomly initialised D of the same architecture
(`augment_gan.downstream.probe_discriminator`). Prints one markdown table to stdout (progress to stderr);
writes results.json (rewritten after every seed), table.md, the folders, runs and synthetic sets under --out.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from augment_gan import __version__
from augment_gan.checkpoint import load_checkpoint
from augment_gan.classifier import accuracy, predict_confidence, train_classifier
from augment_gan.config import TrainConfig
from augment_gan.data import ReadOptions, load_folder
from augment_gan.downstream import probe_discriminator
from augment_gan.errors import UserError
from augment_gan.pseudolabel import CONFIDENCE, PSEUDO_LABELS, PseudoLabels
from augment_gan.recipes import load_recipe
from augment_gan.synth import SynthConfig, synth
from augment_gan.train import fit
from augment_gan.vary import VaryConfig, vary

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from benchkit import choices, finish, numbers, save_results, stats, write_subset  # noqa: E402

RESOLUTION = 32  # the GAN's; the 28 px digits are read at 32 px so every arm trains at one size
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repo
RECIPE = "standard"
BASELINE = "real"
SETS = ("vary", "label-with", "labels-fit")
SAMPLE_SEED = 1234  # latent seed of the synthetic sets (offset by the seed), as in the other benchmarks
TARGET_PP = 3.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: draw, GANs and classifiers (default 0,1,2)")
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated synthetic sets (default {','.join(SETS)})")
    ap.add_argument("--ratios", default="0.25,0.5", help="shares of synthetic images per batch (default 0.25,0.5)")
    ap.add_argument("--combine-ratio", type=float, default=0.25,
                    help="share of synthetic images per batch on top of self-training (default 0.25)")
    ap.add_argument("--fit-minutes", type=float, default=5.0, help="budget of each fit (default 5)")
    ap.add_argument("--fit-clock", choices=("wall", "cpu"), default="wall",
                    help="what --fit-minutes counts: wall time (default; run the benchmark alone) or CPU time")
    ap.add_argument("--fit-kimg", type=float, default=None, help="GAN budget in kimg instead of minutes")
    ap.add_argument("--synthetic", type=int, default=2000, help="images per synthetic set (default 2000)")
    ap.add_argument("--classifier-steps", type=int, default=1000,
                    help="optimizer steps of every classifier (default 1000, as bench_fewshot)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--labeled-per-class", type=int, default=10)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--data-root", type=Path, default=SHARED_DATA / "mnist",
                    help="labeled folder to draw from (default ../shared/data/mnist)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--device", default="cpu", help="device for the fits, sampling and classifiers (default cpu)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<time>-pool)")
    ap.add_argument("--fits-from", type=Path, default=None,
                    help="an earlier run's --out: use its fits (read only) instead of training new ones, to compare "
                         "synthetic-set settings on the same GANs; the draw settings must be the earlier run's")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[bench_pool {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def draw_pool(labels: np.ndarray, labeled_per_class: int, test_per_class: int, seed: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labeled, test, pool) indices: per class `labeled_per_class` labeled and `test_per_class` other test
    images; the pool is every image not in the test set (the labeled ones included)."""
    rng = np.random.default_rng(seed)
    labeled, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < labeled_per_class + test_per_class + 1:
            raise UserError(f"class {c} has {len(idx)} images: too few for {labeled_per_class} labeled, "
                            f"{test_per_class} test and an unlabeled pool")
        labeled.append(idx[:labeled_per_class])
        test.append(idx[labeled_per_class:labeled_per_class + test_per_class])
    labeled, test = np.sort(np.concatenate(labeled)), np.sort(np.concatenate(test))
    pool = np.setdiff1d(np.arange(len(labels)), test)
    return labeled, test, pool


def write_folders(root: Path, files: list[str], labeled: np.ndarray, pool: np.ndarray, out: Path
                  ) -> tuple[Path, Path, list[str]]:
    """out/labeled/<class>/<file> and out/pool/<i:05d><ext> (flat, numbered: no label in a name); returns both
    folders and the pool's file names in `pool` order."""
    labeled_dir, pool_dir = out / "labeled", out / "pool"
    write_subset(root, [files[i] for i in labeled], labeled_dir)
    pool_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for k, i in enumerate(pool):
        names.append(f"{k:05d}{Path(files[i]).suffix}")
        shutil.copy(root / files[i], pool_dir / names[-1])
    return labeled_dir, pool_dir, names


def self_train_labels(model, images: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept indices into `images`, their predicted labels): one round of self-training's pseudo-labels."""
    predicted, confidence = predict_confidence(model, images)
    keep = np.flatnonzero(confidence >= threshold)
    return keep, predicted[keep]


def labels_run_accuracy(run_dir: Path, pool_names: list[str], pool_labels: np.ndarray, classes: list[str]) -> dict:
    """How many pool images the labels run trained on with a pseudo-label, and how many of those are right."""
    record = PseudoLabels.read(run_dir / PSEUDO_LABELS)
    truth = {name: classes[y] for name, y in zip(pool_names, pool_labels.tolist())}
    kept = record.kept()
    right = sum(truth[Path(f).name] == c for f, c in kept.items())
    return {"kept": len(kept), "of": len(record.predicted), "accuracy": right / len(kept) if kept else None}


def make_set(name: str, ckpt, labeled_dir: Path, out: Path, seed: int, args, classes: list[str], n_labeled: int
             ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Write one synthetic set with the product, read it back like a user would; (images, labels, summary)."""
    common = {"seed": SAMPLE_SEED + seed, "device": args.device, "progress": False, "overwrite": True}
    if name == "vary":
        per_image = max(1, round(args.synthetic / n_labeled))
        summary = vary(ckpt, labeled_dir, out, VaryConfig(n=per_image, **common))
    elif name == "label-with":
        summary = synth(ckpt, out, SynthConfig(n=args.synthetic, label_with=str(labeled_dir), **common))
    else:
        summary = synth(ckpt, out, SynthConfig(n=args.synthetic, **common))
    data = load_folder(out, ReadOptions(resolution=RESOLUTION, channels="gray"), use_cache=False, workers=1,
                       progress=False)
    if data.labels is None:
        raise UserError(f"{out} has no class folders")
    remap = np.array([classes.index(c) for c in data.classes])
    return np.ascontiguousarray(data.images), remap[np.asarray(data.labels)], summary.to_dict()


def summarise(results: dict) -> dict:
    """Per arm: accuracy and paired gain over `real` (mean ± std over seeds); the best synthetic arm."""
    runs = results["runs"]
    arms = [a for a in runs[0]["arms"] if all(a in r["arms"] for r in runs)]
    summary = {a: {"accuracy": stats([r["arms"][a]["accuracy"] for r in runs]),
                   "gain": stats([r["arms"][a]["accuracy"] - r["arms"][BASELINE]["accuracy"] for r in runs])}
               for a in arms}
    ours = [a for a in arms if a.split("@")[0] in SETS]
    best = max(ours, key=lambda a: summary[a]["gain"]["mean"]) if ours else None
    verdict = None
    if best is not None:
        gain = summary[best]["gain"]
        verdict = {"arm": best, "gain_pp": 100 * gain["mean"], "every_seed_positive": min(gain["runs"]) > 0,
                   "target_met": 100 * gain["mean"] >= TARGET_PP and min(gain["runs"]) > 0}
    return {"arm_order": arms, "summary": summary, "best": verdict}


def markdown_table(results: dict) -> str:
    runs, summary = results["runs"], results["summary"]
    seeds = [r["seed"] for r in runs]
    head = ["arm", "accuracy (%)", f"Δ vs {BASELINE} (pp)", *[f"Δ seed {s}" for s in seeds]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for arm in results["arm_order"]:
        s = summary[arm]
        name = f"**{arm}** (baseline)" if arm == BASELINE else arm
        cells = [f"{100 * s['accuracy']['mean']:.1f} ± {100 * s['accuracy']['std']:.1f}"]
        cells += (["—"] * (1 + len(seeds)) if arm == BASELINE else
                  [f"{100 * s['gain']['mean']:+.1f} ± {100 * s['gain']['std']:.1f}",
                   *[f"{100 * g:+.1f}" for g in s["gain"]["runs"]]])
        lines.append("| " + " | ".join([name, *cells]) + " |")
    budget = (f"{results['fit_kimg']:g} kimg" if results["fit_kimg"]
              else f"{results['fit_minutes']:g} {results['fit_clock']}-minutes")
    notes = (f"Test accuracy on {results['test_per_class']} images per digit, mean ± std over seeds "
             f"{', '.join(map(str, seeds))}; Δ paired per seed. {results['labeled_per_class']} labeled images per "
             f"digit; pool of {int(np.mean([r['pool_images'] for r in runs]))} images; "
             + (f"the fits of {results['fits_from']}; " if results.get("fits_from") else
                f"fits at {RESOLUTION}px for {budget} each; ")
             + f"{results['synthetic']} images per synthetic set; small CNN, "
             f"{results['classifier_steps']} steps of batch {results['batch_size']}, recipe {RECIPE}; "
             f"{results['threads']} thread(s) on {results['device']}.")
    out = ["\n".join(lines), "", notes]
    best = results["best"]
    if best:
        out += ["", f"Best augment-gan arm: **{best['arm']}**, {best['gain_pp']:+.1f} pp over {BASELINE}; every seed "
                    f"positive: {'yes' if best['every_seed_positive'] else 'no'}; target (≥ +{TARGET_PP:g} pp, every "
                    f"seed positive): **{'met' if best['target_met'] else 'missed'}**. The best ratio is picked on "
                    "the test set, so this number is slightly optimistic."]
    rows = ["| seed | self-train pseudo-labels kept | their accuracy | labels run kept | their accuracy | "
            "probe: trained D | probe: random D | fits (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        st, lr, pr = r["self_train"], r.get("labels_run"), r.get("probe")
        rows.append("| " + " | ".join([
            str(r["seed"]), str(st["kept"]), f"{100 * st['accuracy']:.1f}%" if st["accuracy"] is not None else "—",
            str(lr["kept"]) if lr else "—",
            f"{100 * lr['accuracy']:.1f}%" if lr and lr["accuracy"] is not None else "—",
            f"{100 * pr['trained_d']:.1f}%" if pr else "—", f"{100 * pr['random_d']:.1f}%" if pr else "—",
            " / ".join(f"{f['seconds']:.0f}" for f in r["fits"].values())
            if r["fits"] and not results.get("fits_from") else "—"]) + " |")
    out += ["", "Pseudo-labels and the pool run's D (linear probe on D.features: trained on the labeled images, "
                "tested on the test set; random D = the same architecture at the run's initialisation):", "",
            "\n".join(rows), "", f"`{results['command']}`"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = "python benchmarks/bench_pool.py " + " ".join(argv)
    try:
        seeds = numbers(args.seeds, "seeds", unique=True)
        ratios = numbers(args.ratios, "ratios", float, unique=True)
        sets = choices(args.sets, "set", SETS)
        if not all(0 < r < 1 for r in [*ratios, args.combine_ratio]):
            raise UserError("--ratios and --combine-ratio must be in (0, 1)")
        if min(args.classifier_steps, args.threads, args.test_per_class, args.labeled_per_class, args.synthetic) < 1:
            raise UserError("--classifier-steps, --threads, --test-per-class, --labeled-per-class and --synthetic "
                            "must be >= 1")
        budget = ({"kimg": args.fit_kimg, "minutes": None} if args.fit_kimg
                  else {"minutes": args.fit_minutes, "clock": args.fit_clock})
        base = TrainConfig.from_dict({"resolution": RESOLUTION, **budget})
        load_recipe(RECIPE)  # fail now, not after the first GAN
        out = args.out or Path(__file__).resolve().parent / "results" / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-pool"
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        return _run(args, seeds, ratios, sets, base, out)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def _run(args, seeds: list[int], ratios: list[float], sets: list[str], base: TrainConfig, out: Path) -> int:
    torch.set_num_threads(args.threads)
    cache_dir = out / "cache"
    data = load_folder(args.data_root, ReadOptions(resolution=RESOLUTION, channels="gray"), cache_dir=cache_dir,
                       progress=False)
    if data.labels is None or len(data.classes) < 2:
        raise UserError(f"{args.data_root} needs class subfolders")
    images, labels, classes = np.ascontiguousarray(data.images), np.asarray(data.labels), data.classes
    log(f"{len(images)} images, {len(classes)} classes; sets {', '.join(sets)}")
    results = {"command": args.command, "started": _dt.datetime.now().isoformat(timespec="seconds"),
               "package_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
               "data": str(data.root), "classes": classes, "labeled_per_class": args.labeled_per_class,
               "test_per_class": args.test_per_class, "sets": sets, "ratios": ratios,
               "combine_ratio": args.combine_ratio, "synthetic": args.synthetic, "recipe": RECIPE,
               "classifier_steps": args.classifier_steps, "batch_size": args.batch_size,
               "fit_minutes": args.fit_minutes, "fit_clock": args.fit_clock, "fit_kimg": args.fit_kimg,
               "fit_config": base.to_dict(), "threads": args.threads, "device": args.device,
               "fits_from": str(args.fits_from) if args.fits_from else None, "runs": []}
    recipe, synthetic_recipe = load_recipe(RECIPE, part="real"), load_recipe(RECIPE, part="synthetic")

    for seed in seeds:
        tag = f"seed{seed}"
        lab_idx, test_idx, pool_idx = draw_pool(labels, args.labeled_per_class, args.test_per_class, seed)
        labeled_dir, pool_dir, pool_names = write_folders(data.root, data.files, lab_idx, pool_idx, out / tag)
        x_lab, y_lab, x_te, y_te = images[lab_idx], labels[lab_idx], images[test_idx], labels[test_idx]
        run = {"seed": seed, "labeled_images": len(lab_idx), "pool_images": len(pool_idx),
               "test_images": len(test_idx), "fits": {}, "synthetic": {}, "arms": {}}
        common = {"steps": args.classifier_steps, "batch_size": args.batch_size, "num_classes": len(classes),
                  "device": args.device, "seed": seed, "recipe": recipe}

        def arm(name: str, x, y, extra=None, ratio: float = 0.0):
            t0 = time.monotonic()
            model = (train_classifier(x, y, extra=extra, synthetic_ratio=ratio, extra_recipe=synthetic_recipe,
                                      **common) if extra is not None else train_classifier(x, y, **common))
            run["arms"][name] = {"accuracy": accuracy(model, x_te, y_te), "real_images": len(x),
                                 "synthetic_images": 0 if extra is None else len(extra[0]), "synthetic_ratio": ratio,
                                 "seconds": round(time.monotonic() - t0, 1)}
            log(f"{tag}: {name}: {run['arms'][name]['accuracy']:.1%} ({run['arms'][name]['seconds']:.0f} s)")
            return model

        # The baseline and the self-training reference need no GAN.
        real_model = arm(BASELINE, x_lab, y_lab)
        others = np.setdiff1d(pool_idx, lab_idx)  # pool images that are not labeled ones
        keep, pseudo = self_train_labels(real_model, images[others], CONFIDENCE)
        run["self_train"] = {"kept": len(keep), "of": len(others),
                             "accuracy": float((pseudo == labels[others][keep]).mean()) if len(keep) else None}
        x_st, y_st = np.concatenate([x_lab, images[others][keep]]), np.concatenate([y_lab, pseudo])
        arm("self-train", x_st, y_st)

        # Fits, one after the other, then the synthetic sets.
        ckpts = {}
        needs = {"pool": any(s in ("vary", "label-with") for s in sets), "labels": "labels-fit" in sets}
        for kind in [k for k, need in needs.items() if need]:
            t0 = time.monotonic()
            if args.fits_from is not None:
                run_dir = args.fits_from / tag / f"run-{kind}"
                if not run_dir.is_dir():
                    raise UserError(f"--fits-from: {run_dir} is missing")
                path = run_dir
            else:
                log(f"{tag}: {kind} fit on {len(pool_idx)} pool images")
                run_dir = out / tag / f"run-{kind}"
                path = fit(pool_dir, base.replace(seed=seed), run_dir, device=args.device, cache_dir=cache_dir,
                           progress=False, labels=labeled_dir if kind == "labels" else None)
            ckpts[kind] = load_checkpoint(path, device=args.device)
            meta = ckpts[kind].meta
            run["fits"][kind] = {"checkpoint": str(ckpts[kind].path), "seconds": round(time.monotonic() - t0, 1),
                                 "kimg": meta.kimg, "step": meta.step}
            if kind == "labels":
                run["labels_run"] = labels_run_accuracy(run_dir, pool_names, labels[pool_idx], classes)
        if "pool" in ckpts:
            run["probe"] = probe_discriminator(ckpts["pool"], (x_lab, y_lab), (x_te, y_te), seed=seed,
                                               device=args.device, log=lambda m: log(f"{tag}: {m}"))
        synthetic = {}
        for name in sets:
            t0 = time.monotonic()
            ckpt = ckpts["labels" if name == "labels-fit" else "pool"]
            sx, sy, summary = make_set(name, ckpt, labeled_dir, out / tag / name, seed, args, classes, len(lab_idx))
            synthetic[name] = (sx, sy)
            run["synthetic"][name] = {"images": len(sx), "per_class": np.bincount(sy, minlength=len(classes)).tolist(),
                                      "seconds": round(time.monotonic() - t0, 1), "summary": summary}
            log(f"{tag}: {name}: {len(sx)} images in {run['synthetic'][name]['seconds']:.0f} s")

        for name in sets:
            for r in ratios:
                arm(f"{name}@{r:g}", x_lab, y_lab, synthetic[name], r)
        for name in sets:
            arm(f"self-train+{name}@{args.combine_ratio:g}", x_st, y_st, synthetic[name], args.combine_ratio)

        results["runs"].append(run)
        results.update(summarise(results))
        save_results(out, results)

    table = markdown_table(results)
    finish(out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
