"""`augment`: split, fit, candidate sets, paired measurement and the decision, on tiny MNIST folders.

Two runs are real end to end (the CLI with --json on a long-tailed folder with a class of one image, and a
balanced folder measured with one seed, which can never claim a gain). The decision paths are then driven
with fixed classifier scores (`train_and_score` replaced) on copies of one run interrupted after its
candidate sets, which also exercises resuming.
"""
from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from augment_gan.augment import AugmentConfig, augment, format_result, plan_sets
from augment_gan.cli import app
from augment_gan.decision import REAL, REAL_BALANCED, decide, metric_for, paired_gain, scores
from augment_gan.errors import UserError

from fixtures_run import TINY_NETS

pytest_plugins = ["fixtures_run"]  # digits100 (session-scoped)

# The modules (`augment_gan.augment` is the function) whose functions the tests replace.
AUGMENT, CONFIG, MEASURE = (importlib.import_module(f"augment_gan.{name}")
                             for name in ("augment", "augmentconfig", "measure"))

TAIL = {"0": 8, "1": 8, "2": 5, "3": 1}
"""Long-tailed (8 / 1 >= 3: balanced accuracy, balance sets), with a class of one image."""
EVEN = {"0": 6, "1": 6, "2": 6}

FAST = dict(kimg=0.032, minutes=None, steps=4, batch_size=16, fit_options=dict(TINY_NETS, batch_size=16),
            set_size=1, device="cpu", progress=False)
"""Two fit steps of tiny networks, 4-step classifiers and sets sized by the ratio alone: seconds, not minutes."""
TAIL_CANDIDATES = [f"{s}@{r}" for s in ("synth", "synth-balance", "vary-interpolate-balance") for r in (0.25, 0.5)]


def make_folder(digits100: Path, root: Path, counts: dict[str, int]) -> Path:
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for f in sorted((digits100 / c).iterdir())[:n]:
            shutil.copy(f, root / c / f.name)
    return root


def tree(root: Path) -> list[tuple[str, int, int]]:
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))]


class Stop(Exception):
    """An interruption, raised by a patched function."""


def _stop(*args, **kwargs):
    raise Stop


def fixed_scores(gains: dict[str, list[float]], calls: list[str] | None = None):
    """A `train_and_score` that trains nothing: real-only scores 0.5 + 0.01·seed (with class-balanced sampling
    too, unless gains names `REAL_BALANCED`), candidate `name` that plus gains[name][seed] (-0.01 for candidates
    not named)."""
    def score(name, train, val, extra, ratio, seed, config, recipes, num_classes, device, bar):
        assert (extra is None) == (name in (REAL, REAL_BALANCED)) and len(val[0]) == len(val[1])
        if name == REAL_BALANCED:  # every class of the training part repeated up to the largest one's count
            counts = np.bincount(train[1])
            assert len(set(counts[counts > 0].tolist())) == 1 and len(train[0]) == len(train[1])
        if calls is not None:
            calls.append(f"{name}/{seed}")
        default = [0.0] * 10 if name in (REAL, REAL_BALANCED) else [-0.01] * 10
        value = 0.5 + 0.01 * seed + gains.get(name, default)[seed]
        return {"accuracy": value, "balanced_accuracy": value, "recall": [value] * num_classes}
    return score


@pytest.fixture(scope="module")
def tail(digits100, tmp_path_factory) -> Path:
    return make_folder(digits100, tmp_path_factory.mktemp("tail"), TAIL)


@pytest.fixture(scope="module")
def prepared(tail, tmp_path_factory) -> Path:
    """An augment of `tail` interrupted at its first classifier: split, fit and candidates are done."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MEASURE, "train_and_score", _stop)
        with pytest.raises(Stop):
            augment(tail, out, seeds=3, **FAST)
    assert json.loads((out / "state.json").read_text())["done"] == ["split", "fit", "candidates"]
    return out


@pytest.fixture
def resumed_copy(prepared, tmp_path, monkeypatch) -> Path:
    """A copy of `prepared` whose finished stages must not run again: fit, synth and vary raise if called."""
    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    for module, name in (("augment_gan.train", "fit"), ("augment_gan.synth", "synth"), ("augment_gan.vary", "vary")):
        monkeypatch.setattr(sys.modules[module], name, _stop)
    return out


# ------------------------------------------------------------------------------------------------------
# The pieces.

def test_plan_sets_sizes_each_set_for_the_largest_ratio():
    assert plan_sets([5, 5, 5], [6, 6, 6], (0.25, 0.5)) == [
        {"name": "synth", "command": "synth", "options": {"n": 15}},            # 0.5 / 0.5 × 15 real
        {"name": "vary-interpolate", "command": "vary", "options": {"interpolate": True, "n": 1}}]
    assert plan_sets([5, 5, 5], [6, 6, 6], (0.2,))[0]["options"] == {"n": 4}   # ⌈0.25 × 15⌉
    assert plan_sets([6, 6, 4, 1], [8, 8, 5, 1], (0.25, 0.5)) == [
        {"name": "synth", "command": "synth", "options": {"n": 17}},
        {"name": "synth-balance", "command": "synth", "options": {"balance": True}},
        {"name": "vary-interpolate-balance", "command": "vary", "options": {"interpolate": True, "balance": True}}]
    assert [s["name"] for s in plan_sets([6, 2], [9, 3], (0.5,), encoder=False)] == ["synth", "synth-balance"]
    # AugmentConfig.set_size (2,000) is the floor: a set is never sized for one epoch of a few training images.
    assert plan_sets([5, 5, 5], [6, 6, 6], (0.25, 0.5), set_size=AugmentConfig.set_size) == [
        {"name": "synth", "command": "synth", "options": {"n": 2000}},
        {"name": "vary-interpolate", "command": "vary", "options": {"interpolate": True, "n": 134}}]  # ⌈2000 / 15⌉
    assert plan_sets([3000], [3000], (0.5,), set_size=2000)[0]["options"] == {"n": 3000}


def test_metric_scores_and_paired_gain():
    assert metric_for([6, 6, 6]) == "accuracy" and metric_for([8, 8, 5, 1]) == "balanced_accuracy"
    assert metric_for([3, 1]) == "balanced_accuracy" and metric_for([5, 2]) == "accuracy"   # the bar is 3×
    s = scores(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), 3)
    assert s["accuracy"] == 0.75 and s["recall"] == [1.0, 0.5, None] and s["balanced_accuracy"] == 0.75
    s = scores(np.array([0, 0, 0, 0, 0]), np.array([0, 0, 0, 0, 1]), 2)
    assert s["accuracy"] == 0.8 and s["balanced_accuracy"] == 0.5       # the rare class counts as much
    gain, se = paired_gain([0.5, 0.6, 0.7], [0.6, 0.62, 0.78])
    assert gain == pytest.approx(0.06666667) and se == pytest.approx(np.std([0.1, 0.02, 0.08], ddof=1) / 3 ** 0.5)
    assert paired_gain([0.5], [0.9]) == (pytest.approx(0.4), None)


def _rows(real: list[float], **candidates: list[float]) -> list[dict]:
    rows = [{"candidate": REAL, "seed": s, "accuracy": v, "balanced_accuracy": v, "recall": [v]}
            for s, v in enumerate(real)]
    return rows + [{"candidate": name, "seed": s, "accuracy": v, "balanced_accuracy": v, "recall": [v]}
                   for name, values in candidates.items() for s, v in enumerate(values)]


def test_decide_takes_the_best_gain_larger_than_its_standard_error():
    cands = [{"name": n, "set": n, "ratio": 0.25, "images": 10} for n in ("a", "b", "c")]
    real = [0.70, 0.80, 0.75]
    # a: +5 pp every seed (SE 0); b: +8.3 pp on average but all over the place (SE 9.3 pp); c: worse.
    d = decide(_rows(real, a=[0.75, 0.85, 0.80], b=[0.60, 1.0, 0.90], c=[0.6, 0.7, 0.7]), cands, "accuracy",
               [0, 1, 2])
    assert [c["measurable"] for c in d["candidates"]] == [True, False, False]
    assert d["chosen"] == "a" and "a has the largest mean paired gain" in d["reason"]
    run = d["candidates"][0]["runs"][1]
    assert run == {"seed": 1, "real": 0.80, "mixed": 0.85, "gain": pytest.approx(0.05),
                   "scores": {"accuracy": 0.85, "balanced_accuracy": 0.85, "recall": [0.85]}}
    assert d["real_only"]["runs"][2] == {"seed": 2, "accuracy": 0.75, "balanced_accuracy": 0.75, "recall": [0.75]}
    d = decide(_rows(real, a=[0.69, 0.85, 0.75], b=real, c=real), cands, "accuracy", [0, 1, 2])
    assert d["chosen"] is None and "best: a" in d["reason"]                      # +1.3 pp ± 1.9: not enough
    d = decide(_rows([0.5], a=[0.9], b=[0.9], c=[0.9]), cands, "accuracy", [0])
    assert d["chosen"] is None and "one seed" in d["reason"]
    with pytest.raises(ValueError, match="missing"):
        decide(_rows(real, a=real), cands, "accuracy", [0, 1, 2])


@pytest.mark.parametrize("options, message", [
    ({"val_fraction": 0.0}, "val-fraction"), ({"val_fraction": 0.6}, "val-fraction"), ({"seeds": 0}, "seeds"),
    ({"minutes": 0.0}, "minutes"), ({"minutes": None}, "budget"), ({"ratios": (0.5, 1.0)}, "ratios"),
    ({"ratios": ()}, "empty"), ({"ratios": (0.5, 0.5)}, "repeats"), ({"steps": 0}, "steps"),
    ({"set_size": 0}, "set-size"),
    ({"fit_options": {"minutes": 3}}, "set by augment"), ({"fit_options": {"nope": 1}}, "unknown config keys"),
    ({"recipe": "nope"}, "unknown recipe"), ({"seeds": "3"}, "seeds must be an integer"),
])
def test_config_rejects_bad_values(options, message):
    with pytest.raises(UserError, match=message):
        AugmentConfig(**options)


# ------------------------------------------------------------------------------------------------------
# Real runs.

def test_cli_runs_end_to_end_on_a_long_tail_with_a_class_of_one_image(tail, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(dict(TINY_NETS, batch_size=16)))
    out = tmp_path / "out"
    before = tree(tail)
    result = CliRunner().invoke(app, ["augment", str(tail), "--out", str(out), "--kimg", "0.032", "--steps", "4",
                                      "--set-size", "20", "--seeds", "2", "--config", str(config), "--device", "cpu",
                                      "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)            # stdout holds the result alone; progress went to stderr
    assert "[1/6] split" in result.stderr and "class 3 has one image" in result.stderr
    assert tree(tail) == before                    # DATA is read, never written

    split = json.loads((out / "split.json").read_text())
    assert split["kept_in_training"] == ["3"] and split["train"]["3"] and not split["val"]["3"]
    assert all(len(split["val"][c]) >= 1 for c in ("0", "1", "2"))
    assert sorted(p.name for p in (out / "work" / "val").iterdir()) == ["0", "1", "2"]
    decision = json.loads((out / "decision.json").read_text())
    assert decision["metric"] == summary["metric"] == "balanced_accuracy" and decision["seeds"] == [0, 1]
    assert [c["name"] for c in decision["candidates"]] == TAIL_CANDIDATES
    assert all(len(c["runs"]) == 2 for c in decision["candidates"]) and len(decision["real_only"]["runs"]) == 2
    assert decision["sets"]["synth"]["images"] == 20      # --set-size 20 > ⌈0.5 / 0.5 × 17 training images⌉
    assert decision["split"]["per_class"]["3"] == {"images": 1, "train": 1, "val": 0}
    page = (out / "report.html").read_text()
    assert "Does the synthetic data help?" in page and page.count("data:image/png;base64") >= 5
    assert summary["chosen"] == decision["chosen"]
    chosen = bool(summary["chosen"])
    assert (out / "synthetic" / "manifest.jsonl").is_file() == (out / "recipe.yaml").is_file() == chosen


def test_one_seed_never_claims_a_gain(digits100, tmp_path):
    data = make_folder(digits100, tmp_path / "even", EVEN)
    result = augment(data, tmp_path / "out", seeds=1, **FAST)
    assert result.chosen is None and "one seed" in result.reason and result.metric == "accuracy"
    assert result.python == [] and result.synthetic is None
    decision = json.loads((tmp_path / "out" / "decision.json").read_text())
    assert {name: s["images"] for name, s in decision["sets"].items()} == {"synth": 15, "vary-interpolate": 15}
    assert (tmp_path / "out" / "report.html").is_file()
    assert not (tmp_path / "out" / "synthetic").exists() and not (tmp_path / "out" / "recipe.yaml").exists()
    assert format_result(result).startswith("No measurable gain: one seed")


# ------------------------------------------------------------------------------------------------------
# Decisions on fixed scores, resuming an interrupted run.

def test_a_chosen_candidate_is_written_with_its_recipe_and_merges_on_request(resumed_copy, tail, monkeypatch):
    out = resumed_copy
    gains = {"synth-balance@0.5": [0.10, 0.12, 0.08], "synth@0.25": [0.05, 0.20, -0.10]}
    monkeypatch.setattr(MEASURE, "train_and_score", fixed_scores(gains))
    result = augment(tail, out, seeds=3, **FAST)
    assert result.resumed == ["split", "fit", "candidates"]
    assert (result.chosen, result.set, result.ratio) == ("synth-balance@0.5", "synth-balance", 0.5)
    assert result.gain == pytest.approx(0.10) and result.se == pytest.approx(0.02 / 3 ** 0.5)
    decision = json.loads((out / "decision.json").read_text())
    noisy = next(c for c in decision["candidates"] if c["name"] == "synth@0.25")
    assert noisy["gain"] == pytest.approx(0.05) and not noisy["measurable"]     # SE 8.7 pp
    assert ("Gain: +10.00 ± 1.15 pp balanced accuracy (ACSA) over real-only with class-balanced sampling"
            in format_result(result))
    assert decision["baseline"] == REAL_BALANCED and result.baseline == REAL_BALANCED

    import augment_gan as ag

    assert ag.load_recipe(out / "recipe.yaml").ratio == 0.5
    synthetic = ag.SyntheticImageFolder(out / "synthetic")
    assert len(synthetic) == result.images == decision["sets"]["synth-balance"]["images"] > 0
    namespace: dict = {}
    exec("\n".join(result.python), namespace)              # the printed lines run as they are
    mixed = namespace["mixed"]
    assert mixed.ratio == 0.5 and mixed[len(mixed) - 1][0].shape == mixed[0][0].shape

    result = augment(tail, out, seeds=3, merge=True, **FAST)   # merge does not change the result: no refusal
    assert result.resumed == ["split", "fit", "candidates", "measure", "decide", "outputs"]
    assert result.merged == str(out / "merged") and json.loads((out / "merged" / "merge.json").read_text())["complete"]


def test_no_measurable_gain_writes_the_report_and_decision_only(resumed_copy, tail, monkeypatch):
    out = resumed_copy
    monkeypatch.setattr(MEASURE, "train_and_score", fixed_scores({"synth@0.25": [0.10, -0.05, 0.0]}))
    result = augment(tail, out, seeds=3, merge=True, **FAST)
    assert result.chosen is None and "best: synth@0.25, +1.67 pp ± 4.41 pp" in result.reason
    assert (out / "decision.json").is_file() and (out / "report.html").is_file()
    assert not any((out / name).exists() for name in ("synthetic", "recipe.yaml", "merged"))
    assert "No measurable gain" in (out / "report.html").read_text()


def test_on_imbalanced_classes_a_set_must_beat_class_balanced_sampling(resumed_copy, tail, monkeypatch):
    out = resumed_copy
    # The set gains 5 points over plain real-only training, but balancing the real images gains 8.
    gains = {REAL_BALANCED: [0.08, 0.08, 0.08], "synth-balance@0.5": [0.05, 0.06, 0.04]}
    monkeypatch.setattr(MEASURE, "train_and_score", fixed_scores(gains))
    result = augment(tail, out, seeds=3, **FAST)
    assert result.chosen is None and result.baseline == REAL_BALANCED
    assert result.baseline_score == pytest.approx(0.59) and result.real_only == pytest.approx(0.51)
    decision = json.loads((out / "decision.json").read_text())
    row = next(c for c in decision["candidates"] if c["name"] == "synth-balance@0.5")
    assert row["gain"] == pytest.approx(-0.03) and row["vs_real"]["gain"] == pytest.approx(0.05)
    text = format_result(result)
    assert "over real-only with class-balanced sampling" in result.reason and "WeightedRandomSampler" in text
    assert "class-balanced sampling" in (out / "report.html").read_text()


def test_an_interrupted_measurement_keeps_every_finished_classifier(resumed_copy, tail, monkeypatch):
    out = resumed_copy
    calls: list[str] = []
    score = fixed_scores({}, calls)

    def interrupted(*args, **kwargs):
        if len(calls) == 3:
            raise Stop
        return score(*args, **kwargs)

    monkeypatch.setattr(MEASURE, "train_and_score", interrupted)
    with pytest.raises(Stop):
        augment(tail, out, seeds=3, **FAST)
    with open(out / "work" / "measure.jsonl", "a") as f:
        f.write('{"candidate": "synth@0.2')                 # a line cut short by a killed process
    first = list(calls)
    monkeypatch.setattr(MEASURE, "train_and_score", score)
    result = augment(tail, out, seeds=3, **FAST)
    assert first == ["real/0", "real-balanced/0", "synth@0.25/0"]   # imbalanced: both real-only arms first
    assert len(calls) == 3 + 3 * 8 - 3 and not set(first) & set(calls[3:])   # nothing measured twice
    assert result.resumed == ["split", "fit", "candidates"] and result.chosen is None
    rows = (out / "work" / "measure.jsonl").read_text().splitlines()
    assert len(rows) == 24 and all(json.loads(row) for row in rows)


def test_a_finished_fit_that_was_not_recorded_is_not_run_again(resumed_copy, tail, monkeypatch):
    out = resumed_copy
    state = json.loads((out / "state.json").read_text())
    (out / "state.json").write_text(json.dumps({**state, "done": ["split"]}))   # killed right after the fit
    monkeypatch.setattr(MEASURE, "train_and_score", fixed_scores({}))
    result = augment(tail, out, seeds=3, **FAST)        # fit, synth and vary raise if called
    assert result.resumed == ["split"] and result.chosen is None


def test_other_settings_are_refused_and_overwrite_starts_again(resumed_copy, tail, monkeypatch):
    out = resumed_copy
    with pytest.raises(UserError, match="other settings.*seeds 3 -> 5"):
        augment(tail, out, seeds=5, **FAST)
    monkeypatch.setattr(AUGMENT, "_stage_split", _stop)
    with pytest.raises(Stop):
        augment(tail, out, seeds=5, overwrite=True, **FAST)
    assert not (out / "work").exists() and not (out / "state.json").exists()
    assert json.loads((out / "augment.json").read_text())["config"]["seeds"] == 5


@pytest.mark.skipif(not CONFIG._fit_takes_labels(), reason="this tree has no unlabeled-pool fit (fit --labels)")
def test_an_unlabeled_pool_is_fit_with_the_training_part_as_its_labels(tail, shared_data, tmp_path, monkeypatch):
    from augment_gan.pseudolabel import LabelerConfig

    pool = tmp_path / "pool"
    pool.mkdir()
    for c in TAIL:
        for f in sorted((shared_data / "mnist" / c).iterdir())[20:25]:   # digits `tail` does not hold
            shutil.copy(f, pool / f"{c}-{f.name}")
    train, seen = sys.modules["augment_gan.train"], {}
    real_fit = train.fit

    def fit(folder, config, out_dir, *, labels=None, **options):   # the real fit, a 5-step labelling classifier
        seen.update(folder=Path(folder), labels=Path(labels))
        return real_fit(folder, config, out_dir, labels=labels, labeler=LabelerConfig(steps=5, held_out=0.0),
                        **options)

    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(MEASURE, "train_and_score", fixed_scores({}))
    out = tmp_path / "out"
    result = augment(tail, out, unlabeled=pool, seeds=2, **FAST)
    assert seen == {"folder": pool, "labels": out / "work" / "train"} and result.chosen is None
    assert json.loads((out / "augment.json").read_text())["config"]["unlabeled"] == str(pool.resolve())


# ------------------------------------------------------------------------------------------------------
# Refusals before any work.

def _bad_inputs(digits100: Path, tmp: Path) -> list[list[str]]:
    flat = tmp / "flat"
    flat.mkdir()
    for f in sorted((digits100 / "7").iterdir())[:4]:
        shutil.copy(f, flat / f.name)
    one = make_folder(digits100, tmp / "one", {"5": 4})
    even = make_folder(digits100, tmp / "even", EVEN)
    singles = make_folder(digits100, tmp / "singles", {"0": 1, "1": 1, "2": 3})
    return [[str(flat)], [str(tmp / "missing")], [str(one)], [str(singles)],
            [str(even), "--val-fraction", "0.6"], [str(even), "--seeds", "0"], [str(even), "--minutes", "0"],
            [str(even), "--ratios", "0.5,1.5"], [str(even), "--recipe", "nope"],
            [str(even), "--unlabeled", str(tmp / "missing")], [str(even), "--unlabeled", str(flat)]]


def test_bad_input_is_one_line_and_creates_nothing(digits100, tmp_path, monkeypatch):
    monkeypatch.setattr(CONFIG, "_fit_takes_labels", lambda: False)   # the unlabeled-pool fit, not there yet
    runner = CliRunner()
    out = tmp_path / "new" / "out"
    for args in _bad_inputs(digits100, tmp_path):
        result = runner.invoke(app, ["augment", *args, "--out", str(out)])
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, (args, result.output)
        assert not (tmp_path / "new").exists(), args
    flat = runner.invoke(app, ["augment", str(tmp_path / "flat"), "--out", str(out)])
    assert all(text in flat.output for text in ("no class subfolders", "augment-gan fit", "augment-gan synth"))
    pool = runner.invoke(app, ["augment", str(tmp_path / "even"), "--unlabeled", str(tmp_path / "flat"),
                               "--out", str(out)])
    assert "unlabeled-pool fit" in pool.output
