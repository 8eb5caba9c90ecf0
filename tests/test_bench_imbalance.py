"""The long-tail benchmark script: its metrics on hand-computed confusion matrices, the long-tailed draw and the
resampling arms, and one short run end to end on a small real digit folder. Scores are only checked to be scores
(quality needs minutes of training; the benchmark itself is for measuring)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from benchscripts import BENCHMARKS, load_benchmark
from fakesynth import copy_classes

# Rows: true class, columns: predicted class. Recalls 8/10, 3/4, 5/10.
CM = np.array([[8, 2, 0],
               [1, 3, 0],
               [0, 5, 5]])


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_imbalance")


def test_confusion_counts_true_rows_and_predicted_columns(bench):
    cm = bench.confusion(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 0, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [2, 0, 0]]


def test_metrics_on_a_hand_computed_confusion_matrix(bench):
    assert bench.recalls(CM).tolist() == pytest.approx([0.8, 0.75, 0.5])
    assert bench.acsa(CM) == pytest.approx((0.8 + 0.75 + 0.5) / 3)
    assert bench.g_mean(CM) == pytest.approx(0.3 ** (1 / 3))  # (0.8 · 0.75 · 0.5)^(1/3)
    # F1 = 2TP / (2TP + FP + FN): class 0: 16 / (16 + 1 + 2); class 1: 6 / (6 + 7 + 1); class 2: 10 / (10 + 0 + 5).
    f1 = (Fraction(16, 19) + Fraction(6, 14) + Fraction(10, 15)) / 3
    assert bench.macro_f1(CM) == pytest.approx(float(f1))
    s = bench.scores(CM, rare=[2, 1])
    assert s["rare_recall"] == pytest.approx(0.625) and s["acsa"] == bench.acsa(CM)


def test_a_class_never_recognised_zeroes_the_g_mean_but_not_acsa(bench):
    cm = np.array([[5, 0], [5, 0]])  # class 1 always predicted as 0
    assert bench.acsa(cm) == 0.5 and bench.g_mean(cm) == 0.0
    assert bench.macro_f1(cm) == pytest.approx((10 / 15 + 0) / 2)  # class 1: no TP, never predicted
    perfect = np.eye(4, dtype=int) * 3
    assert bench.acsa(perfect) == bench.g_mean(perfect) == bench.macro_f1(perfect) == 1.0
    with pytest.raises(bench.UserError, match="no test images"):
        bench.recalls(np.array([[1, 0], [0, 0]]))


def test_metrics_agree_with_scikit_learn_and_imbalanced_learn(bench):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    cm = bench.confusion(y_true, y_pred, 5)
    assert bench.acsa(cm) == pytest.approx(metrics.balanced_accuracy_score(y_true, y_pred))
    assert bench.macro_f1(cm) == pytest.approx(metrics.f1_score(y_true, y_pred, average="macro"))
    imb = pytest.importorskip("imblearn.metrics")
    assert bench.g_mean(cm) == pytest.approx(imb.geometric_mean_score(y_true, y_pred, average="multiclass"))


def test_rarest_orders_by_count_and_prefers_the_later_class_on_ties(bench):
    assert bench.rarest(list(bench.COUNTS), 5) == [9, 8, 7, 6, 5]
    assert bench.rarest([5, 2, 2, 3], 3) == [2, 1, 3]


def test_draw_longtail_takes_the_counts_and_a_disjoint_balanced_test_set(bench):
    labels = np.repeat(np.arange(3), 10)
    train, test = bench.draw_longtail(labels, [6, 3, 1], 4, seed=0)
    assert np.bincount(labels[train]).tolist() == [6, 3, 1]
    assert np.bincount(labels[test]).tolist() == [4, 4, 4] and not set(train) & set(test)
    assert np.array_equal(train, bench.draw_longtail(labels, [6, 3, 1], 4, seed=0)[0])
    assert not np.array_equal(train, bench.draw_longtail(labels, [6, 3, 1], 4, seed=1)[0])
    with pytest.raises(bench.UserError, match="class 0 has 10 images"):
        bench.draw_longtail(labels, [7, 3, 1], 4, seed=0)


def test_oversampling_balances_and_repeats_every_image_evenly(bench):
    labels = np.array([0] * 7 + [1] * 3 + [2])
    idx = bench.oversample_indices(labels, [7, 7, 7], seed=0)
    assert np.bincount(labels[idx]).tolist() == [7, 7, 7]
    repeats = np.bincount(idx, minlength=len(labels))
    assert repeats[:7].tolist() == [1] * 7 and sorted(repeats[7:10].tolist()) == [2, 2, 3] and repeats[10] == 7


def test_synth_half_fills_half_of_each_shortfall_with_synthetic_images(bench):
    y = np.array([0] * 8 + [1] * 4 + [2] * 1)
    x = np.arange(len(y), dtype=np.uint8)[:, None, None, None].repeat(4, 1)
    sy = np.array([1] * 4 + [2] * 7)  # what synth --balance writes: 8 - n_c per class
    sx = np.full((len(sy), 4, 1, 1), 200, np.uint8)
    real_x, real_y, (extra_x, extra_y) = bench.arm_pools("synth-half", x, y, 0, {"synth": (sx, sy)})
    assert np.bincount(extra_y, minlength=3).tolist() == [0, 2, 3]  # 4 // 2, 7 // 2
    assert (np.bincount(real_y) + np.bincount(extra_y, minlength=3)).tolist() == [8, 8, 8]
    assert len(real_x) == len(real_y) and (extra_x == 200).all()
    _, balanced, extra = bench.arm_pools("oversample", x, y, 0, {})
    assert extra is None and np.bincount(balanced).tolist() == [8, 8, 8]


def test_smote_balances_on_pixels(bench):
    pytest.importorskip("imblearn")
    rng = np.random.default_rng(0)
    y = np.array([0] * 6 + [1] * 2)
    x = rng.integers(0, 256, (len(y), 4, 4, 1), dtype=np.uint8)
    xs, ys = bench.smote_resample(x, y, seed=0)
    assert xs.dtype == np.uint8 and xs.shape == (12, 4, 4, 1) and np.bincount(ys).tolist() == [6, 6]
    assert np.array_equal(xs[:8], x)  # the real images come first, unchanged


def test_a_missing_imbalanced_learn_says_how_to_install_it(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "imblearn", None)  # makes `import imblearn...` raise ImportError
    monkeypatch.setitem(sys.modules, "imblearn.over_sampling", None)
    with pytest.raises(bench.UserError, match="pip install imbalanced-learn"):
        bench.import_smote()


COUNTS = [8, 6, 5, 4, 3, 3, 2, 2, 2, 2]


def test_short_run_writes_results_and_table(bench, tmp_path: Path, shared_data: Path):
    data = copy_classes(shared_data / "mnist", tmp_path / "digits", 0, 12)
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCHMARKS / "bench_imbalance.py"), "--data-root", str(data), "--seeds", "0,1",
           "--counts", ",".join(map(str, COUNTS)), "--test-per-class", "4", "--fit-kimg", "0.064",
           "--classifier-steps", "10", "--batch-size", "16", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    # Every arm either ran or was skipped with its reason; the resampling arms need nothing optional.
    ran, skipped = results["arms"], results["skipped"]
    assert sorted(ran + list(skipped)) == sorted(bench.ARMS) and {"none", "oversample"} <= set(ran)
    if importlib.util.find_spec("imblearn") is None:
        assert "smote" in skipped and "pip install imbalanced-learn" in proc.stderr
    else:
        assert "smote" in ran
    for arm in ("synth-balance", "synth-half", "interp-balance"):
        assert arm in ran or "option" in skipped[arm]

    assert [run["seed"] for run in results["runs"]] == [0, 1] and results["rare"] == [9, 8, 7, 6, 5]
    for run in results["runs"]:
        assert run["train_images"] == sum(COUNTS) and run["test_images"] == 40
        assert set(run["arms"]) == set(ran)
        for arm, r in run["arms"].items():
            assert all(0 <= r[m] <= 1 for m in bench.METRICS) and len(r["recall"]) == 10
            assert np.asarray(r["confusion"]).sum(1).tolist() == [4] * 10
        assert run["arms"]["none"]["real_pool"] == sum(COUNTS)
        assert run["arms"]["oversample"]["real_pool"] == 10 * max(COUNTS)
    assert results["vs_baseline"]["oversample"]["acsa"]["mean"] == 0
    assert results["summary"]["none"]["acsa"]["runs"] == [run["arms"]["none"]["acsa"] for run in results["runs"]]
    train = out / "seed0" / "train"
    assert [len(list((train / str(c)).glob("*.png"))) for c in range(10)] == COUNTS

    assert "| arm | ACSA | macro-F1 | G-mean | recall, 5 rarest | Δ ACSA vs oversample |" in proc.stdout
    assert "| **oversample** (baseline) |" in proc.stdout and "| none |" in proc.stdout
    assert "Δ ACSA vs oversample per seed (pp):" in proc.stdout and "| DeepSMOTE | 96.09 |" in proc.stdout
    assert (out / "table.md").read_text().strip() == proc.stdout.strip()

    # The GAN arms, once synth --balance and vary --interpolate --balance exist: sets, grids and memorisation.
    made = {name for run in results["runs"] for name in run["synthetic"]}
    assert made == {name for name in ("synth-balance", "interp-balance")
                    if name in ran or (name == "synth-balance" and "synth-half" in ran)}
    for name in made:
        s = results["runs"][0]["synthetic"][name]
        if name == "synth-balance":  # synth --balance: N - n_c images of class c
            assert s["per_class"] == [max(COUNTS) - n for n in COUNTS]
        assert s["per_class"][0] == 0 and all(n > 0 for n in s["per_class"][1:])
        assert set(s["memorisation"]["per_class"]) == {str(c) for c in range(10)}
        assert s["memorisation"]["per_class"]["0"] is None  # the largest class gets no synthetic image
        assert all(0 <= v <= 1 for v in s["memorisation"]["per_class"].values() if v is not None)
        assert all((out / "seed0" / "grids" / f"{name}-class{c}.png").is_file() for c in (9, 8, 7))
        assert f"| {name} |" in proc.stdout

    # oversample-checked: the synth-balance images a second classifier assigns to their class, on top of
    # oversampling; --fits-from reuses the fits (read only) for new arms.
    if "oversample-checked" in ran:
        for run in results["runs"]:
            s = run["synthetic"]["synth-balance"]
            assert s["checked"]["seed"] == run["seed"] + bench.CHECK_SEED
            assert all(0 <= k <= n for k, n in zip(s["checked"]["kept_per_class"], s["per_class"]))
            assert run["arms"]["oversample-checked"]["synthetic_images"] == sum(s["checked"]["kept_per_class"])
        assert "oversample-checked: share of each class's synth-balance images" in proc.stdout
        again = tmp_path / "again"
        cmd2 = [*cmd[:cmd.index("--out")], "--seeds", "0", "--arms", "oversample,oversample-checked", "--fits-from",
                str(out), "--out", str(again)]
        proc = subprocess.run(cmd2, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reused = json.loads((again / "results.json").read_text())
        assert reused["fits_from"] == str(out) and not (again / "seed0" / "run").exists()
        assert Path(reused["runs"][0]["fit"]["checkpoint"]).is_relative_to(out / "seed0" / "run")
        assert reused["runs"][0]["arms"]["oversample"] == results["runs"][0]["arms"]["oversample"] | {
            "seconds": reused["runs"][0]["arms"]["oversample"]["seconds"]}
        assert f"the conditional fits of {out}" in proc.stdout


def test_bad_arguments_are_one_line_errors(tmp_path: Path, shared_data: Path):
    script = str(BENCHMARKS / "bench_imbalance.py")
    proc = subprocess.run([sys.executable, script, "--arms", "none,bogus", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: unknown arm(s) bogus")
    assert "Traceback" not in proc.stderr
    data = copy_classes(shared_data / "mnist", tmp_path / "digits", 0, 3, classes=("0", "1"))
    proc = subprocess.run([sys.executable, script, "--arms", "none", "--data-root", str(data), "--counts", "1,1,1",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Error: --counts lists 3 numbers but" in proc.stderr
    assert "Traceback" not in proc.stderr
