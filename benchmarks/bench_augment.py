"""Does `augment`'s decision hold on images it never saw? Predicted vs realised gain on three folders.

For each folder and seed: draw DATA and a disjoint test set, write DATA as an ImageFolder (<out>/<folder>/seed<S>/
data/, files copied), run `augment(DATA, DIR, AugmentConfig(...))` as a user would (the product's defaults but
the fit budget, the device and --steps), and then measure on the test set what its decision is worth:

    fewshot    10 images per digit of ../shared/data/mnist, test: 100 other images per digit (balanced: accuracy)
    longtail   bench_imbalance's COUNTS, 400 ... 4 images of digits 0-9 (ratio 100), test: 200 other images per
               digit (balanced accuracy). The draw is bench_imbalance's `draw_longtail`, imported, so seed S is
               its seed S folder; `fewshot` uses it too with 10 per class, which is bench_pool's labeled draw.
    emoji      ../shared/data/emoji-twitter (9 categories, 85-386 images, 4.5:1), test: a stratified 25% of every
               category (`classifier.stratified_split`, by seed), DATA the other 75% (balanced accuracy).

The realised gain: augment's own measurement (`measure.measure`: the small CNN, its steps, batch size, recipe
and the recipe's real/synthetic parts, its threads), trained on ALL of DATA real-only (also with
class-balanced sampling when that is augment's baseline: imbalanced classes) and
with the chosen set (DIR/synthetic, read back from disk) at the chosen ratio, for augment's own classifier
seeds, paired per seed against augment's baseline, scored on the test set with augment's metric. The scores go through
`decision.decide` as a one-candidate decision on the test set, so the paired gain, its standard error and the
"gain > SE" bar are the library's. Every image is read as augment's classifiers read theirs
(`measure.read_options` of DIR/work/run: the fit's resolution, fit, background and channels); the test images
come from the source folder, read once per source through the cache. When augment answered "no measurable
gain" the user trains on real images only, so the realised gain is 0 by definition; the best rejected
candidate (largest mean gain on the validation split) is then measured on the test set all the same, to see
whether the "no" was right (its test gain is not positive and larger than its SE).

Why the test classifiers train on all of DATA, not on augment's training part: that is what the user does
with the answer (DATA + DIR/synthetic, recipe.yaml). The predicted gain comes from classifiers on 80% of DATA,
so a realised gain somewhat below the predicted one is expected where more real images help more.

Targets (the issue): on every folder the realised test gain is ≥ 0 (its mean over the seeds: never harm) and
within the predicted gain's spread, and on `longtail` ≥ +3 pp. Within the spread means
|realised − predicted| ≤ 2·√(SE_pred² + SE_real²): both are means over 3 paired seeds, so their difference has
about that standard error and 2 of them is a two-sided ~95% band. With no choice both are 0 (within).

Stage times: augment records which stages are done (state.json), not how long they took, so they are timed
from the outside: augment logs "[k/6] <stage>" when a stage begins (logger augment_gan.augment, which this
script raises to INFO and forwards to stderr); a stage lasts until the next begins, the last until augment
returns. The test measurement (reading and the test classifiers) is timed here.

    python benchmarks/bench_augment.py                                    # the three folders, 5 wall-minutes per fit
    python benchmarks/bench_augment.py --folders longtail --seeds 0,1,2 --minutes 10
    python benchmarks/bench_augment.py --folders fewshot --kimg 0.05 --steps 10 --set-size 1 --shots 3 \\
        --test-per-class 2 --fit-config TINY.yaml --mnist DIGITS          # smoke test on a small folder

Prints markdown tables to stdout (progress to stderr): the decision and its test, the best rejected candidates,
the wall time per stage. Writes results.json (rewritten after every folder), table.md, and per folder and seed
DATA and augment's DIR under --out. `minutes` is wall-clock: run the benchmark alone on the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import platform
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


from augment_gan import __version__
from augment_gan.augment import DECISION, AugmentConfig, augment
from augment_gan.classifier import stratified_split
from augment_gan.config import load_config_file
from augment_gan.data import load_folder, scan_folder
from augment_gan.decision import BASELINES, METRICS, REAL, REAL_BALANCED, decide
from augment_gan.device import resolve_device
from augment_gan.downstream import align_labels
from augment_gan.errors import UserError
from augment_gan.measure import load_labeled, measure, read_options, read_results

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_imbalance import COUNTS, SHARED_DATA, draw_longtail  # noqa: E402  (the long-tailed draw, shared)
from benchkit import choices, finish, numbers, save_results, write_subset  # noqa: E402

FOLDERS = ("fewshot", "longtail", "emoji")
SOURCE = {"fewshot": "mnist", "longtail": "mnist", "emoji": "emoji"}
"""The option (--mnist, --emoji) naming the folder each kind is drawn from."""
SHOTS = 10  # images per digit in `fewshot`: bench_fewshot's and bench_pool's K
TEST_PER_CLASS = {"fewshot": 100, "longtail": 200}  # longtail: bench_imbalance's TEST_PER_CLASS
TEST_FRACTION = 0.25  # of every emoji category, for testing
TARGET_GAIN = {"fewshot": 0.0, "longtail": 0.03, "emoji": 0.0}
"""Least realised test gain (a fraction: 0.03 is 3 pp) per folder: never harm, and +3 pp on the long tail."""
SPREAD = 2.0
SPREAD_RULE = "|realised − predicted| ≤ 2·√(SE_pred² + SE_real²)"
TIMED = (("split", ("split",)), ("fit", ("fit",)), ("candidates", ("candidates",)), ("measure", ("measure",)),
         ("decide + outputs", ("decide", "outputs")))
"""Columns of the timing table: augment's stages, the two short last ones together."""
_ROUNDING = 1e-9
_STAGE_START = re.compile(r"\[\d+/\d+\] (\w+)")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--folders", default=",".join(FOLDERS), help=f"comma-separated folders (default {','.join(FOLDERS)})")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds: the draw and augment's --seed; one augment "
                                                 "per folder and seed (default 0)")
    ap.add_argument("--minutes", type=float, default=AugmentConfig.minutes,
                    help=f"augment's fit budget in wall-clock minutes (default {AugmentConfig.minutes:g})")
    ap.add_argument("--kimg", type=float, default=None, help="augment's fit budget in kimg instead of --minutes")
    ap.add_argument("--steps", type=int, default=AugmentConfig.steps,
                    help=f"optimizer steps of every classifier, augment's and the test's (default {AugmentConfig.steps})")
    ap.add_argument("--set-size", type=int, default=AugmentConfig.set_size,
                    help=f"augment's fewest images per candidate set (default {AugmentConfig.set_size})")
    ap.add_argument("--fit-config", type=Path, default=None, help="YAML of TrainConfig fields for augment's fit "
                                                                   "(augment --config)")
    ap.add_argument("--shots", type=int, default=SHOTS, help=f"images per digit in fewshot (default {SHOTS})")
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)),
                    help="comma-separated images per digit in longtail, in class order (default 400,...,4)")
    ap.add_argument("--test-per-class", type=int, default=None,
                    help="test images per digit in fewshot and longtail (default 100 and 200)")
    ap.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                    help=f"share of every emoji category held out for testing (default {TEST_FRACTION:g})")
    ap.add_argument("--mnist", type=Path, default=SHARED_DATA / "mnist",
                    help="digit folder of fewshot and longtail (default ../shared/data/mnist)")
    ap.add_argument("--emoji", type=Path, default=SHARED_DATA / "emoji-twitter",
                    help="folder of emoji (default ../shared/data/emoji-twitter)")
    ap.add_argument("--device", default="cpu", help="augment's device, and the test classifiers' (default cpu)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<time>-augment)")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[bench_augment {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# The folders and the verdict: pure functions.


def draw(folder: str, labels: np.ndarray, seed: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(DATA indices, test indices) into the source folder's files, sorted and disjoint."""
    if folder == "emoji":
        return stratified_split(labels, args.test_fraction, seed)
    num_classes = int(labels.max()) + 1
    counts = [args.shots] * num_classes if folder == "fewshot" else numbers(args.counts, "counts", minimum=1)
    if len(counts) != num_classes:
        raise UserError(f"--counts lists {len(counts)} numbers but the digit folder has {num_classes} classes")
    return draw_longtail(labels, counts, args.test_per_class or TEST_PER_CLASS[folder], seed)


def within_spread(realised: float, realised_se: float | None, predicted: float, predicted_se: float | None) -> bool:
    """`SPREAD_RULE`: the realised gain is within 2 standard errors of the difference of the two means."""
    return abs(realised - predicted) <= SPREAD * math.hypot(predicted_se or 0.0, realised_se or 0.0)


def verdict(folder: str, predicted: float, predicted_se: float | None, realised: float,
            realised_se: float | None) -> dict:
    """The issue's targets for one folder, from the predicted and the realised gain (fractions)."""
    within = within_spread(realised, realised_se, predicted, predicted_se)
    least = TARGET_GAIN[folder]
    # A mean of paired differences of k/n scores that cancel can come out as -1e-17: that is 0, no harm.
    return {"never_harm": realised >= -_ROUNDING, "within_spread": within, "least_gain": least,
            "target_met": bool(realised >= least - _ROUNDING and within)}


def stage_seconds(starts: list[tuple[str, float]], end: float) -> dict[str, float]:
    """Wall seconds of every stage from the times the stages began (in order); the last one ends at `end`."""
    ends = [t for _, t in starts[1:]] + [end]
    return {name: round(stop - start, 1) for (name, start), stop in zip(starts, ends)}


def best_rejected(decision: dict) -> dict | None:
    """The candidate with the largest mean gain on the validation split (the first of equals), or None."""
    return max(decision["candidates"], key=lambda c: c["gain"]) if decision["candidates"] else None


# ----------------------------------------------------------------------------------------------------
# Running augment, and its test.


class _StageClock(logging.Handler):
    """Notes when augment begins each stage ("[k/N] <stage>") and forwards its progress lines to stderr."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.starts: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        match = _STAGE_START.fullmatch(message)
        if match:
            self.starts.append((match.group(1), record.created))
        if record.levelno < logging.WARNING:  # warnings reach stderr through logging itself
            log(f"augment: {message}")


@contextmanager
def stage_clock() -> Iterator[_StageClock]:
    """A `_StageClock` on augment's logger (raised to INFO) for the duration of the block."""
    logger = logging.getLogger(augment.__module__)  # measure.py logs there too
    clock, saved = _StageClock(), logger.level
    logger.addHandler(clock)
    logger.setLevel(logging.INFO)
    try:
        yield clock
    finally:
        logger.removeHandler(clock)
        logger.setLevel(saved)


def measure_on_test(candidate: dict, extra: tuple[np.ndarray, np.ndarray], train: tuple[np.ndarray, np.ndarray],
                    test: tuple[np.ndarray, np.ndarray], decision: dict, config: AugmentConfig, num_classes: int,
                    path: Path) -> dict:
    """`candidate` of `decision` measured on the test set by augment's own `measure.measure` (scores appended to
    `path`): its classifiers trained on `train` (all of DATA) real-only (also with class-balanced sampling when
    that is augment's baseline) and with `extra` at the candidate's ratio, for each of augment's seeds; a
    one-candidate `decide` against augment's baseline on the test scores (gain, SE, measurable, per-seed runs)."""
    seeds, baseline = decision["seeds"], decision.get("baseline", REAL)
    one = {k: candidate[k] for k in ("name", "set", "ratio", "images")}
    measure(path, train, test, {candidate["set"]: extra}, [one], seeds, num_classes, config,
            str(resolve_device(config.device)), balance=baseline == REAL_BALANCED)
    return decide(read_results(path), [one], decision["metric"], seeds, baseline=baseline)


def read_test_images(source: Path, files: list[str], options, classes: list[str], cache_dir: Path
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N×H×W×C, labels indexing `classes`) of `files` of the source folder, read with `options`."""
    loaded = load_folder(source, options, cache_dir=cache_dir, progress=False)
    index = {f: i for i, f in enumerate(loaded.files)}
    unread = [f for f in files if f not in index]
    if unread:
        raise UserError(f"{len(unread)} test image(s) could not be read, first {unread[0]}")
    rows = np.array([index[f] for f in files])
    return np.ascontiguousarray(loaded.images[rows]), align_labels(classes, loaded, "test")[rows]


def run_folder(folder: str, seed: int, scan, drawn: tuple[np.ndarray, np.ndarray], base: AugmentConfig, out: Path
               ) -> dict:
    """One folder and seed: write DATA (`drawn`: DATA and test indices into `scan`), augment, test; the record
    that goes into results.json."""
    tag = f"{folder} seed {seed}"
    root = out / folder / f"seed{seed}"
    labels = np.asarray(scan.labels)
    data_idx, test_idx = drawn
    data_dir, aug_dir = root / "data", root / "augment"
    write_subset(scan.root, [scan.files[i] for i in data_idx], data_dir)
    data_counts = np.bincount(labels[data_idx], minlength=len(scan.classes)).tolist()
    log(f"{tag}: DATA {len(data_idx)} images {data_counts}, test {len(test_idx)} images; augment")

    config = dataclasses.replace(base, seed=seed)
    with stage_clock() as clock:
        result = augment(data_dir, aug_dir, config)
    stages = stage_seconds(clock.starts, time.time())
    decision = json.loads((aug_dir / DECISION).read_text())
    chosen = next((c for c in decision["candidates"] if c["name"] == decision["chosen"]), None)
    log(f"{tag}: augment chose {decision['chosen'] or 'nothing'} in {result.seconds:.0f} s: {decision['reason']}")

    # The test: every image read as augment's classifiers read theirs.
    t0 = time.monotonic()
    options = read_options(aug_dir / "work" / "run")
    classes = scan_folder(data_dir).classes  # augment's class order
    cache_dir = out / "cache"
    train = load_labeled(data_dir, options, classes, cache_dir, "training")
    test = read_test_images(scan.root, [scan.files[i] for i in test_idx], options, classes, cache_dir)
    candidate = chosen or best_rejected(decision)  # with "no", measured for information
    tried = tested = None
    if candidate is not None:
        folder_of_set = aug_dir / "synthetic" if chosen else Path(decision["sets"][candidate["set"]]["folder"])
        extra = load_labeled(folder_of_set, options, classes, cache_dir, "synthetic")
        tried = measure_on_test(candidate, extra, train, test, decision, config, len(classes),
                                root / "test-measure.jsonl")
        tested = on_test(candidate, tried)
    seconds_test = round(time.monotonic() - t0, 1)

    if chosen is not None:
        predicted = {"gain": chosen["gain"], "se": chosen["se"]}
        realised = {k: tested["test"][k] for k in ("gain", "se", "std", "runs")}
    else:  # the user trains on real images only: nothing changes
        predicted = {"gain": 0.0, "se": 0.0}
        realised = {"gain": 0.0, "se": 0.0, "std": 0.0, "runs": [0.0] * len(decision["seeds"])}
    record = {
        "folder": folder, "seed": seed, "source": str(scan.root),
        "data": {"folder": str(data_dir), "images": len(data_idx), "classes": list(scan.classes),
                 "per_class": data_counts, "imbalance": decision["imbalance"]},
        "test": {"images": len(test_idx),
                 "per_class": np.bincount(labels[test_idx], minlength=len(scan.classes)).tolist(),
                 "real_only": tried["real_only"]["mean"] if tried else None,
                 "baseline_score": _baseline_score(tried) if tried else None,
                 "real_only_runs": [r[decision["metric"]] for r in tried["real_only"]["runs"]] if tried else None},
        "augment": {"dir": str(aug_dir), "metric": decision["metric"], "chosen": decision["chosen"],
                    "reason": decision["reason"], "real_only_val": decision["real_only"]["mean"],
                    "baseline": decision.get("baseline", REAL), "baseline_val": _baseline_score(decision),
                    "seeds": decision["seeds"], "channels": 1 if options.channels == "gray" else 3,
                    "classifier": decision["classifier"], "seconds": result.seconds},
        "predicted": predicted, "realised": realised,
        "chosen": tested if chosen is not None else None, "rejected": tested if chosen is None else None,
        "verdict": verdict(folder, predicted["gain"], predicted["se"], realised["gain"], realised["se"]),
        "seconds": {**stages, "augment": result.seconds, "test": seconds_test},
    }
    v = record["verdict"]
    log(f"{tag}: realised test gain {100 * realised['gain']:+.2f} pp (predicted {100 * predicted['gain']:+.2f}); "
        f"within spread: {_yes(v['within_spread'])}; target {'met' if v['target_met'] else 'missed'} "
        f"(test measurement {seconds_test:.0f} s)")
    return record


def on_test(candidate: dict, tried: dict) -> dict:
    """A candidate of augment's decision.json next to its one-candidate `decide` on the test set (`tried`)."""
    row = tried["candidates"][0]
    gains = [r["gain"] for r in row["runs"]]
    return {"name": candidate["name"], "set": candidate["set"], "ratio": candidate["ratio"],
            "images": candidate["images"],
            "predicted": {"gain": candidate["gain"], "se": candidate["se"], "runs": [r["gain"] for r in candidate["runs"]]},
            "test": {"gain": row["gain"], "se": row["se"], "std": _std(gains), "runs": gains,
                     "real_only": tried["real_only"]["mean"], "baseline": tried["baseline"],
                     "baseline_score": _baseline_score(tried), "vs_real": row.get("vs_real"),
                     "mixed": row["mean"], "measurable": row["measurable"]},
            "within_spread": within_spread(row["gain"], row["se"], candidate["gain"], candidate["se"])}


def _baseline_score(decision: dict) -> float:
    """Mean score of a decision's baseline arm (decisions written before `REAL_BALANCED` have no baseline)."""
    return decision["real_balanced" if decision.get("baseline", REAL) == REAL_BALANCED else "real_only"]["mean"]


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# ----------------------------------------------------------------------------------------------------
# The tables.


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _pp(value: float, spread: float | None = None) -> str:
    return f"{100 * value:+.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "")


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def markdown_table(results: dict) -> str:
    runs = results["runs"]
    head = ["folder", "seed", "DATA images", "classes", "imbalance", "metric", "decision", "predicted gain (val)",
            "baseline (test)", "realised gain (test)", "per seed (test)", "within spread", "target"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|"]
    for r in runs:
        p, g, v, c = r["predicted"], r["realised"], r["verdict"], r["chosen"]
        real = r["test"]["baseline_score"]
        lines.append("| " + " | ".join([
            r["folder"], str(r["seed"]), str(r["data"]["images"]), str(len(r["data"]["classes"])),
            f"{r['data']['imbalance']:.1f}", METRICS[r["augment"]["metric"]],
            f"{c['name']} ({c['images']} images)" if c else "no measurable gain",
            _pp(p["gain"], p["se"]) if c else "—",
            (f"{BASELINES[r['augment']['baseline']]} {100 * real:.1f}%" if real is not None else "—"),
            _pp(g["gain"], g["std"]) if c else "0 (real only)",
            " / ".join(_pp(x) for x in g["runs"]) if c else "—",
            _yes(v["within_spread"]),
            f"{'met' if v['target_met'] else '**missed**'} (≥ {100 * v['least_gain']:+.0f} pp)"]) + " |")
    first = runs[0]["augment"]["classifier"] if runs else {}
    budget = (f"{results['kimg']:g} kimg" if results["kimg"] else f"{results['minutes']:g} wall-minutes")
    tests = "; ".join(f"{r['folder']} {r['test']['images']}" for r in runs)
    notes = (f"Gains in percentage points of the folder's metric. Predicted: augment's mean paired gain ± SE on its "
             f"validation split ({results['augment_config']['val_fraction']:.0%} of each class). Realised: the "
             f"same classifier ({first.get('model')}, {first.get('steps')} steps of batch {first.get('batch_size')}, "
             f"recipe {first.get('recipe')}) trained on all of DATA real-only and with the chosen set at its ratio, "
             f"paired over augment's {results['augment_config']['seeds']} seeds, mean ± std, on test images augment "
             f"never saw ({tests}); the baseline is augment's: real-only, with class-balanced sampling on imbalanced "
             f"classes. Within spread: {SPREAD_RULE}, SE = std / √seeds. Target: realised ≥ the least "
             f"gain and within spread. Fit: {budget} per folder on {results['device']}. augment-gan "
             f"{results['package_version']}, torch {results['torch']}, {results['platform']}, "
             f"{results['started'][:10]}.")
    out = ["\n".join(lines), "", notes]

    rejected = [r for r in runs if r["rejected"]]
    if rejected:
        rows = [("| folder | seed | best rejected | predicted gain (val) | realised gain (test) | per seed (test) | "
                 "within spread | measurable on test |"), "|---|---:|---|---:|---:|---:|---|---|"]
        for r in rejected:
            c = r["rejected"]
            rows.append("| " + " | ".join([
                r["folder"], str(r["seed"]), f"{c['name']} ({c['images']} images)",
                _pp(c["predicted"]["gain"], c["predicted"]["se"]), _pp(c["test"]["gain"], c["test"]["std"]),
                " / ".join(_pp(x) for x in c["test"]["runs"]), _yes(c["within_spread"]),
                "**yes** (the no was wrong)" if c["test"]["measurable"] else "no"]) + " |")
        out += ["", ("Where augment said no: its best candidate on the validation split, measured on the test set "
                     "all the same (measurable: mean gain positive and larger than its SE, augment's own bar):"), "",
                "\n".join(rows)]

    head = ["folder", "seed", *(name for name, _ in TIMED), "augment in total", "test measurement"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in runs:
        s = r["seconds"]
        cells = [_seconds(sum(s[k] for k in keys) if all(k in s for k in keys) else None) for _, keys in TIMED]
        rows.append("| " + " | ".join([r["folder"], str(r["seed"]), *cells, _seconds(s["augment"]),
                                       _seconds(s["test"])]) + " |")
    out += ["", ("Wall time (s) of each stage: augment's from its stage log lines, the test's (reading, "
                 "2 or 3 classifiers per seed) timed here:"), "", "\n".join(rows),
            "", f"`{results['command']}`"]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# The benchmark.


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    args.command = "python benchmarks/bench_augment.py " + " ".join(argv)
    try:
        folders = choices(args.folders, "folder", FOLDERS)
        seeds = numbers(args.seeds, "seeds")
        numbers(args.counts, "counts", minimum=1)
        if args.shots < 1 or (args.test_per_class is not None and args.test_per_class < 1):
            raise UserError("--shots and --test-per-class must be >= 1")
        if not 0 < args.test_fraction < 1:
            raise UserError(f"--test-fraction must be in (0, 1), got {args.test_fraction:g}")
        fit_options = load_config_file(args.fit_config) if args.fit_config is not None else None
        base = AugmentConfig(minutes=None if args.kimg else args.minutes, kimg=args.kimg, steps=args.steps,
                             set_size=args.set_size, fit_options=fit_options, device=args.device, progress=False)
        out = args.out or Path(__file__).resolve().parent / "results" / f"{_dt.datetime.now():%Y%m%d-%H%M%S}-augment"
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty; choose another --out")
        scans = {}
        for name in sorted({SOURCE[f] for f in folders}):
            scan = scan_folder(getattr(args, name))
            if scan.labels is None or len(scan.classes) < 2:
                raise UserError(f"--{name} {scan.root} needs class subfolders")
            scans[name] = scan
        # Every draw before any fit, so that a folder too small for its draw is an error now.
        draws = {(f, s): draw(f, np.asarray(scans[SOURCE[f]].labels), s, args) for f in folders for s in seeds}
        out.mkdir(parents=True, exist_ok=True)
        return _run(args, folders, seeds, scans, draws, base, out)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


def _run(args, folders: list[str], seeds: list[int], scans: dict, draws: dict, base: AugmentConfig, out: Path
         ) -> int:
    config = base.to_dict()
    results = {"command": args.command, "started": _dt.datetime.now().isoformat(timespec="seconds"),
               "package_version": __version__, "torch": torch.__version__, "platform": platform.platform(),
               "device": args.device, "folders": folders, "seeds": seeds, "minutes": config["minutes"],
               "kimg": config["kimg"], "augment_config": {k: v for k, v in config.items() if k != "seed"},
               "sources": {name: str(scan.root) for name, scan in scans.items()},
               "spread_rule": SPREAD_RULE, "target_gain": TARGET_GAIN, "runs": []}
    for folder in folders:
        for seed in seeds:
            results["runs"].append(run_folder(folder, seed, scans[SOURCE[folder]], draws[folder, seed], base, out))
            save_results(out, results)
    table = markdown_table(results)
    finish(out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
