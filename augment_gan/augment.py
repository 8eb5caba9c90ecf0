"""`augment`: from a labeled image folder to a synthetic set that is measured to help, or a plain "no".

`augment(DATA, DIR)` runs these stages; each is recorded in DIR/state.json when it is done, so the same call
after an interruption resumes where it stopped and never redoes a finished stage:

1. split: a stratified validation split of DATA, the same for every seed (`val_fraction` of each class, at
   least one image of every class with two or more; a class of one image stays in training, is reported,
   and is not measured). DIR/split.json lists the files; DIR/work/train/ and DIR/work/val/ hold them as hard
   links (copies where links are impossible), so `fit` reads a plain folder and DATA is never written.
2. fit: a conditional `fit` on the training part into DIR/work/run, `minutes` wall-clock (or `kimg`) in total;
   an interrupted fit continues from its last checkpoint (`fit(resume=True)`), within the same budget. With
   `unlabeled`, the unlabeled-pool fit: `fit(POOL, ..., labels=DIR/work/train)`, accepted only when `fit` takes
   `labels` (checked before any work; otherwise a one-line error).
3. candidates: synthetic sets in DIR/work/candidates/<set> (`plan_sets`): `synth` balanced over the classes,
   n = max(`set_size`, r/(1−r)·n_train) images for the largest ratio r; `synth --balance` when the classes are
   imbalanced (largest/smallest ≥ 3, `decision.IMBALANCE`); `vary --interpolate`, with `--balance` when
   imbalanced, else as many variations per image as make n. Each set is then a candidate at every ratio of `ratios`
   (the share of synthetic images per classifier batch), named "<set>@<ratio>".
4. measure: the small CNN of `augment_gan.classifier` with `recipe`, `steps` steps, scored on the held-out
   split. Seed s trains the real-only model (and, when the classes are imbalanced, a real-only model with
   class-balanced sampling) and one real+candidate model per candidate, all with seed s, so the differences
   are paired; the real-only models are trained once per seed and shared (same seed, same model). Every
   score is appended to DIR/work/measure.jsonl as soon as it exists: an interruption loses at most the
   classifier that was training.
5. decide (`augment_gan.decision`): accuracy, or balanced accuracy when the classes are imbalanced; the best
   candidate whose mean paired gain over the baseline is positive and larger than its standard error, else
   "no measurable gain". The baseline is real-only training, with class-balanced sampling when the classes
   are imbalanced (`decision.baseline_for`: balancing needs no GAN, so a synthetic set must beat it).
   DIR/decision.json holds every candidate's per-seed scores, the metric, the split, the choice and why.
6. outputs: DIR/report.html (the run's `report` plus the decision table and per-class sample grids); when a
   candidate was chosen, DIR/synthetic (its set, manifest included) and DIR/recipe.yaml (`recipe` with the
   chosen ratio). With `merge`, DIR/merged: DATA (all of it) and the chosen set as an ImageFolder (`merge`).

DIR/augment.json records the settings that define the result; a later call with other settings is refused
unless `overwrite`, which deletes what augment wrote there and starts again. `merge`, `device`, `threads` and
`progress` do not define the result: a finished DIR can be rerun with `merge` to add the merged folder only.
DIR/work keeps the intermediate stages: the run in DIR/work/run can write more images with `synth`.

Why the split stays fixed across seeds: the GAN is trained on the training part once, so only those images
may be in any classifier's training set; the seeds vary the classifiers (initialisation, batches,
augmentations), which is the noise the paired comparison has to see through.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from augment_gan.augmentconfig import (
    SETTINGS,
    AugmentConfig,
    check_inputs,
    make_settings,
    settings_identity,
)
from augment_gan.decision import (
    BASELINES,
    IMBALANCE,
    METRICS,
    REAL,
    REAL_BALANCED,
    baseline_for,
    class_grid,
    decide,
    decision_section,
    imbalance,
    metric_for,
)
from augment_gan.measure import load_labeled, measure, read_options, read_results
from augment_gan.outputs import check_out_folder, read_json, write_json

_log = logging.getLogger(__name__)

STATE = "state.json"
SPLIT = "split.json"
MEASURE = "measure.jsonl"
DECISION = "decision.json"
RECIPE = "recipe.yaml"
REPORT = "report.html"
STAGES = ("split", "fit", "candidates", "measure", "decide", "outputs", "merge")
_OWNED = ("work", "synthetic", "merged", SETTINGS, STATE, SPLIT, DECISION, RECIPE, REPORT)
"""What `overwrite` deletes in DIR: the names augment writes there, nothing else."""

__all__ = ["AugmentConfig", "AugmentResult", "augment", "format_result", "plan_sets"]


@dataclass
class AugmentResult:
    """What `augment` decided and wrote (`to_dict()` is what `augment-gan augment --json` prints)."""

    out: str
    metric: str
    """accuracy or balanced_accuracy."""
    chosen: str | None
    """The chosen candidate ("<set>@<ratio>"), or None: no measurable gain."""
    set: str | None
    ratio: float | None
    gain: float | None
    """Mean paired gain of the chosen candidate in the metric (a fraction: 0.02 is 2 points)."""
    se: float | None
    """Its standard error over the seeds."""
    real_only: float
    """Mean metric of the real-only classifiers."""
    baseline: str
    """The arm the gain is measured over: `real`, or `real-balanced` (class-balanced sampling) on imbalanced
    classes."""
    baseline_score: float
    """Mean metric of the baseline's classifiers."""
    seeds: int
    reason: str
    decision: str
    report: str
    synthetic: str | None
    images: int | None
    recipe: str | None
    merged: str | None
    python: list[str] = field(default_factory=list)
    """Lines of Python that train on the chosen set in a torchvision pipeline (empty without a choice)."""
    resumed: list[str] = field(default_factory=list)
    """Stages found done in DIR and skipped."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# The run folder and its state.

@dataclass
class _Run:
    """What the stages share: the inputs, the folder, and which stages are done."""

    data: Path
    out: Path
    config: AugmentConfig
    device: str
    scan: Any
    state: dict[str, Any]
    _split: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def work(self) -> Path:
        return self.out / "work"

    def split(self) -> dict[str, Any]:
        """DIR/split.json, written by the split stage; read once (it lists every file of DATA)."""
        if self._split is None:
            self._split = read_json(self.out / SPLIT) or {}
        return self._split

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def mark(self, stage: str) -> None:
        self.state["done"].append(stage)
        self.save()

    def save(self) -> None:
        write_json(self.out / STATE, self.state)


def _clear(out: Path) -> None:
    """Delete what an earlier augment wrote in `out` (only the names augment writes)."""
    for name in _OWNED:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (instant, no space), or a copy where the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _fresh(folder: Path) -> Path:
    """`folder`, emptied: what an interrupted stage left there is redone, never trusted."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------------------------------
# Stages.

def _stage_split(run: _Run) -> None:
    from augment_gan.classifier import stratified_split

    scan, config = run.scan, run.config
    labels = np.asarray(scan.labels)
    train, val = stratified_split(labels, config.val_fraction, config.seed)
    counts = np.bincount(labels, minlength=len(scan.classes))
    kept = [c for c, n in zip(scan.classes, counts) if n < 2]
    for c in kept:
        _log.warning(f"class {c} has one image: too few to split, so it stays in training and is not measured")
    for part, idx in (("train", train), ("val", val)):
        root = _fresh(run.work / part)
        for i in idx:
            dst = root / scan.files[i]
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(str(scan.root / scan.files[i]), str(dst))
    by_class: dict[str, dict[str, list[str]]] = {}
    for part, idx in (("train", train), ("val", val)):
        by_class[part] = {c: [] for c in scan.classes}
        for i in idx:
            by_class[part][scan.classes[scan.labels[i]]].append(scan.files[i])
    write_json(run.out / SPLIT, {"data": str(scan.root), "val_fraction": config.val_fraction, "seed": config.seed,
                                 "classes": list(scan.classes), "counts": counts.tolist(),
                                 "kept_in_training": kept, **by_class})
    _log.info(f"split {len(labels)} images of {len(scan.classes)} classes: {len(train)} to train on, "
              f"{len(val)} held out")


def _stage_fit(run: _Run) -> None:
    from augment_gan.checkpoint import list_checkpoints, read_meta
    from augment_gan.monitor import Budget
    from augment_gan.train import Interrupted, fit

    train_config = run.config.train_config()
    folder = run.work / "run"
    existing = list_checkpoints(folder)
    if existing:
        meta = read_meta(existing[-1])
        if Budget(train_config, meta.elapsed_s, True, 1).done(meta.nimg):
            return  # finished before the stage could be recorded
        _log.info(f"continuing the interrupted fit from step {meta.step}")
    source: Path = run.work / "train"
    extra: dict[str, Any] = {}   # fit's `labels` only when asked: a fit without that parameter still works
    if run.config.unlabeled is not None:  # the unlabeled-pool fit: the pool's images, the training part's labels
        source, extra = Path(run.config.unlabeled).expanduser(), {"labels": run.work / "train"}
    try:
        fit(source, train_config, folder, resume=bool(existing), device=run.device, progress=run.config.progress,
            **extra)
    except Interrupted:   # fit's own message says "--resume", which augment does itself
        raise Interrupted(f"interrupted during the fit; its last checkpoint is kept in {folder}: run the same "
                          "command again to continue") from None


def plan_sets(train_counts: list[int], data_counts: list[int], ratios: tuple[float, ...], *,
              encoder: bool = True, set_size: int = 1) -> list[dict[str, Any]]:
    """The synthetic sets to make: [{"name", "command" (synth or vary), "options"}] (module docstring, stage 3).

    Balanced sets hold n = max(`set_size`, ⌈r/(1−r)·n_train⌉) images for the largest ratio r: at least what one
    epoch of `MixedSampler` at that ratio draws without repeating (`AugmentConfig.set_size`). `vary` needs the
    latent encoder (`encoder`).
    """
    n_real = sum(train_counts)
    r = max(ratios)
    needed = max(set_size, math.ceil(r / (1 - r) * n_real))
    imbalanced = imbalance(data_counts) >= IMBALANCE
    sets: list[dict[str, Any]] = [{"name": "synth", "command": "synth", "options": {"n": needed}}]
    if imbalanced:
        sets.append({"name": "synth-balance", "command": "synth", "options": {"balance": True}})
    if encoder:
        sets.append({"name": "vary-interpolate-balance" if imbalanced else "vary-interpolate", "command": "vary",
                     "options": {"interpolate": True,
                                 **({"balance": True} if imbalanced else {"n": math.ceil(needed / n_real)})}})
    return sets


def _sets(run: _Run) -> list[dict[str, Any]]:
    split = run.split()
    train_counts = [len(files) for files in split["train"].values()]
    return plan_sets(train_counts, split["counts"], run.config.ratios,
                     encoder=run.config.train_config().encoder_weight > 0, set_size=run.config.set_size)


def _candidates(run: _Run) -> list[dict[str, Any]]:
    """Every (set, ratio) candidate, in a fixed order."""
    return [{"name": f"{s['name']}@{r:g}", "set": s["name"], "ratio": r} for s in _sets(run) for r in run.config.ratios]


def _stage_candidates(run: _Run) -> None:
    from augment_gan.checkpoint import load_checkpoint
    from augment_gan.synth import SynthConfig, synth
    from augment_gan.vary import VaryConfig, vary

    sets = _sets(run)
    if not any(s["command"] == "vary" for s in sets):
        _log.info("no vary candidate: the fit trains no latent encoder (encoder_weight 0)")
    ckpt = load_checkpoint(run.work / "run", device=run.device)
    made = run.state.setdefault("sets", [])
    for s in sets:
        if s["name"] in made:
            continue
        out = run.work / "candidates" / s["name"]
        options = {**s["options"], "seed": run.config.seed, "device": run.device, "progress": run.config.progress}
        _log.info(f"candidate set {s['name']}: {s['command']} {json.dumps(s['options'])}")
        if s["command"] == "synth":
            synth(ckpt, out, SynthConfig(**options))
        else:
            vary(ckpt, run.work / "train", out, VaryConfig(**options))
        made.append(s["name"])
        run.save()


def _load(run: _Run, folder: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N×H×W×C, labels in DATA's class order) of a folder of the run, read as the fit read its images."""
    return load_labeled(folder, read_options(run.work / "run"), list(run.scan.classes), run.work / "cache", what)


def _stage_measure(run: _Run) -> None:
    train, val = _load(run, run.work / "train", "training"), _load(run, run.work / "val", "validation")
    sets = {s["name"]: _load(run, run.work / "candidates" / s["name"], "synthetic") for s in _sets(run)}
    split = run.split()
    measure(run.work / MEASURE, train, val, sets, _candidates(run), _seeds(run.config), len(run.scan.classes),
            run.config, run.device, balance=baseline_for(split["counts"]) == REAL_BALANCED)


def _seeds(config: AugmentConfig) -> list[int]:
    return [config.seed + s for s in range(config.seeds)]


def _stage_decide(run: _Run) -> None:
    from augment_gan.manifest import MANIFEST, read_manifest

    config, split = run.config, run.split()
    images = {s["name"]: sum(1 for row in read_manifest(run.work / "candidates" / s["name"] / MANIFEST) if row.kept)
              for s in _sets(run)}
    candidates = [{**c, "images": images[c["set"]]} for c in _candidates(run)]
    metric = metric_for(split["counts"])
    decision = decide(read_results(run.work / MEASURE), candidates, metric, _seeds(config),
                      baseline=baseline_for(split["counts"]))
    decision.update({
        "imbalance": imbalance(split["counts"]),
        "split": {"file": str(run.out / SPLIT), "val_fraction": split["val_fraction"], "seed": split["seed"],
                  "per_class": {c: {"images": n, "train": len(split["train"][c]), "val": len(split["val"][c])}
                                for c, n in zip(split["classes"], split["counts"])},
                  "kept_in_training": split["kept_in_training"]},
        "classifier": {"model": "SmallCNN", "recipe": config.recipe, "steps": config.steps,
                       "batch_size": config.batch_size},
        "sets": {s["name"]: {"command": s["command"], "options": s["options"], "images": images[s["name"]],
                             "folder": str(run.work / "candidates" / s["name"])} for s in _sets(run)},
    })
    write_json(run.out / DECISION, decision)


def _recipe_yaml(recipe: str, ratio: float, chosen: str) -> str:
    """`recipe` with `ratio` as its synthetic_ratio, as a recipe file."""
    import yaml

    from augment_gan.recipes import parse_recipe, read_recipe_text

    name, text = read_recipe_text(recipe)
    data = parse_recipe(text, f"recipe {name}")
    data["description"] = f"{name} with {ratio:.0%} synthetic images (augment-gan augment chose {chosen})"
    data["mix"] = {"use_synthetic": True, "synthetic_ratio": ratio}
    return ("# Written by `augment-gan augment`: the recipe the decision measured, with the chosen ratio.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def _stage_outputs(run: _Run) -> None:
    from augment_gan.atomic import write_bytes_atomic
    from augment_gan.recipes import load_recipe

    decision = read_json(run.out / DECISION) or {}
    chosen = next((c for c in decision["candidates"] if c["name"] == decision["chosen"]), None)
    if (run.out / "synthetic").is_dir():  # what an interrupted earlier attempt of this stage left
        shutil.rmtree(run.out / "synthetic")
    (run.out / RECIPE).unlink(missing_ok=True)
    if chosen is not None:
        shutil.copytree(run.work / "candidates" / chosen["set"], run.out / "synthetic", copy_function=_link_or_copy,
                        ignore=shutil.ignore_patterns(".*"))
        write_bytes_atomic(run.out / RECIPE, _recipe_yaml(run.config.recipe, chosen["ratio"], chosen["name"]).encode())
        load_recipe(run.out / RECIPE)  # what is written loads
    write_bytes_atomic(run.out / REPORT, _report_page(run, decision).encode("utf-8"))


def _stage_merge(run: _Run) -> None:
    from augment_gan.merge import merge_folders

    merge_folders(run.data, run.out / "synthetic", run.out / "merged", run.out / RECIPE, seed=run.config.seed,
                  progress=run.config.progress)


# ----------------------------------------------------------------------------------------------------
# The report.

def _report_page(run: _Run, decision: dict[str, Any]) -> str:
    """The run's report (`report.build_report`) with the decision and per-class grids added."""
    from augment_gan.report import build_report

    classes = list(run.scan.classes)
    grids = [(title, class_grid(*_load(run, folder, what), len(classes))) for title, folder, what in
             [("real, training part", run.work / "train", "training"),
              *((name, run.work / "candidates" / name, "synthetic") for name in decision["sets"])]]
    page = build_report(run.work / "run")
    end = page.rindex("</body></html>")
    return page[:end] + decision_section(decision, classes, grids) + "\n" + page[end:]


# ----------------------------------------------------------------------------------------------------
# The command.

def augment(data: str | os.PathLike[str], out: str | os.PathLike[str], config: AugmentConfig | None = None,
            **options: Any) -> AugmentResult:
    """Split DATA, fit on the training part, make candidate synthetic sets, measure each against real-only
    training on the held-out part, and write the chosen set, its recipe, the decision and a report to `out`
    (`augment-gan augment`; the stages and files are in this module's docstring).

    Give the settings as an `AugmentConfig` or as its fields: `augment("data", "out", minutes=10, seeds=5)`.
    Rerunning the same call resumes an interrupted one; other settings need `overwrite=True`.
    """
    if config is None:
        config = AugmentConfig(**options)
    elif options:
        raise TypeError("give either an AugmentConfig or its fields as keywords, not both")
    t_start = time.perf_counter()
    out = Path(out).expanduser()
    scan = check_inputs(data, out, config)
    from augment_gan.device import resolve_device
    from augment_gan.guard import output_lock

    device = str(resolve_device(config.device))
    settings = make_settings(scan.root, config)
    # A second augment into this folder would redo the same stages and remove each other's files: refused.
    with output_lock(out, "augment"):
        old, replace = check_out_folder(out, SETTINGS, overwrite=config.overwrite, settings=settings,
                                        identity=settings_identity)
        if old is not None and (replace or config.overwrite):
            _clear(out)
            old = None
        if old is None:
            write_json(out / SETTINGS, settings)
        state = (read_json(out / STATE) if old is not None else None) or {"done": []}
        run = _Run(Path(scan.root), out, config, device, scan, state)
        resumed = [s for s in STAGES if run.done(s)]
        if resumed:
            _log.info(f"resuming {out}: {', '.join(resumed)} already done")
        stages = [("split", _stage_split), ("fit", _stage_fit), ("candidates", _stage_candidates),
                  ("measure", _stage_measure), ("decide", _stage_decide), ("outputs", _stage_outputs)]
        for k, (name, stage) in enumerate(stages, 1):
            if not run.done(name):
                _log.info(f"[{k}/{len(stages)}] {name}")
                stage(run)
                run.mark(name)
        decision = read_json(out / DECISION) or {}
        if config.merge and decision["chosen"] is None:
            _log.warning("--merge: no measurable gain, so there is no chosen set to merge")
        elif config.merge and not run.done("merge"):
            _log.info("merging DATA and the chosen set")
            _stage_merge(run)
            run.mark("merge")
    return _result(run, decision, resumed, time.perf_counter() - t_start)


def _python_lines(data: Path, out: Path, ratio: float) -> list[str]:
    recipe, synthetic = str(out / RECIPE), str(out / "synthetic")
    return ["import augment_gan as ag; from torchvision.datasets import ImageFolder",
            f"recipe = ag.load_recipe({recipe!r})   # synthetic_ratio {ratio:g}",
            f"real = ImageFolder({str(data)!r}, transform=recipe)",
            f"mixed = ag.MixedDataset(real, ag.SyntheticImageFolder({synthetic!r}, transform=ag.load_recipe("
            f"{recipe!r}, part='synthetic'), class_to_idx=real.class_to_idx), ratio=recipe.ratio)"]


def _result(run: _Run, decision: dict[str, Any], resumed: list[str], seconds: float) -> AugmentResult:
    chosen = next((c for c in decision["candidates"] if c["name"] == decision["chosen"]), None)
    out, baseline = run.out, decision.get("baseline", REAL)
    return AugmentResult(
        out=str(out), metric=decision["metric"], chosen=decision["chosen"],
        set=chosen["set"] if chosen else None, ratio=chosen["ratio"] if chosen else None,
        gain=chosen["gain"] if chosen else None, se=chosen["se"] if chosen else None,
        real_only=decision["real_only"]["mean"], baseline=baseline,
        baseline_score=decision["real_balanced" if baseline == REAL_BALANCED else "real_only"]["mean"],
        seeds=len(decision["seeds"]), reason=decision["reason"],
        decision=str(out / DECISION), report=str(out / REPORT),
        synthetic=str(out / "synthetic") if chosen else None, images=chosen["images"] if chosen else None,
        recipe=str(out / RECIPE) if chosen else None,
        merged=str(out / "merged") if chosen and run.done("merge") else None,
        python=_python_lines(run.data, out, chosen["ratio"]) if chosen else [],
        resumed=resumed, seconds=round(seconds, 3))


def format_result(result: AugmentResult) -> str:
    """The summary `augment-gan augment` prints."""
    r = result
    metric = METRICS[r.metric]
    over = BASELINES[r.baseline]
    if r.chosen is None:
        lines = [f"No measurable gain: {r.reason}.",
                 f"{over[:1].upper() + over[1:]} {metric}: {100 * r.baseline_score:.1f}%"
                 + (f" (without it {100 * r.real_only:.1f}%)" if r.baseline == REAL_BALANCED else "")
                 + ". Nothing to use; the report and the decision are all that was written."]
        if r.baseline == REAL_BALANCED:
            lines.append("Train on your real images with class-balanced sampling (e.g. torch.utils.data."
                         "WeightedRandomSampler with weight 1/n_class for an image of a class of n_class).")
    else:
        assert r.gain is not None and r.se is not None  # a chosen candidate has both
        lines = [f"Gain: {100 * r.gain:+.2f} ± {100 * r.se:.2f} pp {metric} over {over} "
                 f"{100 * r.baseline_score:.1f}% (mean ± SE of {r.seeds} paired seeds).",
                 f"Chosen: {r.set} at synthetic ratio {r.ratio:g}: {r.synthetic} ({r.images} images), "
                 f"recipe {r.recipe}" + (f", merged ImageFolder {r.merged}" if r.merged else "") + ".",
                 "Use it in a torchvision pipeline (then DataLoader(mixed, sampler=ag.MixedSampler(mixed), ...)):",
                 *(f"    {line}" for line in r.python)]
    lines.append(f"Report: {r.report}; every candidate and seed: {r.decision}")
    return "\n".join(lines)
