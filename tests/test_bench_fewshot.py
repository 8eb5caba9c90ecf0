"""The few-shot benchmark script end to end on a small real digit folder: the K-shot draw, a conditional fit,
balanced synthetic images, the paired classifier arms and the table. Accuracies are only checked to be
accuracies (quality needs minutes of training; the benchmark itself is for measuring)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchscripts import BENCHMARKS, load_benchmark
from fakesynth import copy_classes


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_fewshot")


def test_draw_shots_takes_k_per_class_and_tests_on_the_rest(bench):
    labels = np.repeat(np.arange(3), 10)
    train, test = bench.draw_shots(labels, 4, seed=0)
    assert np.bincount(labels[train]).tolist() == [4, 4, 4]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(30))
    assert not np.array_equal(train, bench.draw_shots(labels, 4, seed=1)[0])  # the seed changes the draw
    assert np.array_equal(train, bench.draw_shots(labels, 4, seed=0)[0])


def test_short_run_writes_results_and_table(tmp_path: Path, shared_data: Path):
    data = copy_classes(shared_data / "mnist", tmp_path / "digits", 0, 12, classes=("0", "1", "7"))
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCHMARKS / "bench_fewshot.py"), "--data", str(data), "--shots", "3",
           "--seeds", "1", "--fit-kimg", "0.064", "--steps", "10", "--synthetic", "30", "--ratios", "0.25,0.5",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| K / class | real only | + synthetic 0.25 | + synthetic 0.5 | best gain |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    (run,) = results["shots"]["3"]["runs"]
    assert run["train_images"] == 9 and run["test_images"] == 27
    assert 0 <= run["real_only"] <= 1 and set(run["mixed"]) == {"0.25", "0.5"}
    assert all(0 <= acc <= 1 for acc in run["mixed"].values())
    assert (out / "k3-seed0" / "synthetic.png").is_file() and run["resumed"] is False

    # --resume continues that fit to a larger budget instead of starting over.
    cmd[cmd.index("0.064")] = "0.128"
    proc = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (again,) = json.loads((out / "results.json").read_text())["shots"]["3"]["runs"]
    assert again["resumed"] is True and again["fit_kimg"] > run["fit_kimg"] >= 0.064
    assert "resume the fit" in proc.stderr

    # --fits-from reuses those GANs read-only for other synthetic sets: D rejection, then vary.
    checkpoints = sorted((out / "k3-seed0" / "run" / "checkpoints").iterdir())
    base = cmd[:cmd.index("--out")] + ["--ratios", "0.5"]
    top = tmp_path / "top"
    proc = subprocess.run(base + ["--out", str(top), "--fits-from", str(out), "--keep-top", "0.5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((top / "results.json").read_text())
    (run,) = results["shots"]["3"]["runs"]
    assert results["keep_top"] == 0.5 and results["fits_from"] == str(out) and "keep-top 0.5" in proc.stdout
    weights = [c for c in checkpoints if c.suffix == ".safetensors" and not c.name.endswith(".state.safetensors")]
    assert run["checkpoint"] == str(weights[-1])  # the run's latest checkpoint
    assert run["synthetic_images"] == 30 and run["synthetic_summary"]["dropped_keep_top"] == 30
    assert len(list((top / "k3-seed0" / "synthetic").rglob("*.png"))) == 30
    assert not (top / "k3-seed0" / "run").exists()
    assert sorted((out / "k3-seed0" / "run" / "checkpoints").iterdir()) == checkpoints  # nothing trained

    varied = tmp_path / "vary"
    proc = subprocess.run(base + ["--out", str(varied), "--fits-from", str(out), "--source", "vary",
                                  "--synthetic", "18", "--classifier-seeds", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((varied / "results.json").read_text())["shots"]["3"]["runs"]
    assert run["classifier_seeds"] == [0, 1000] and len(run["real_only_runs"]) == len(run["mixed_runs"]["0.5"]) == 2
    assert run["real_only"] == pytest.approx(np.mean(run["real_only_runs"]))
    assert "each the mean of 2 classifiers" in proc.stdout
    assert run["synthetic_images"] == 18  # 2 variations of each of the 9 training images, in their class
    train = sorted(p.relative_to(varied / "k3-seed0" / "train").with_suffix("")
                   for p in (varied / "k3-seed0" / "train").rglob("*.png"))
    made = sorted((varied / "k3-seed0" / "synthetic").rglob("*.png"))
    assert [m.relative_to(varied / "k3-seed0" / "synthetic").as_posix() for m in made] == sorted(
        f"{t.as_posix()}_{k}.png" for t in train for k in range(2))

    # --gans 2: two fits per draw (seeds 0 and 1000), each writing half of the synthetic set; --label-filter real
    # drops what the real-only classifier assigns to another class.
    ensemble = tmp_path / "ensemble"
    proc = subprocess.run(base + ["--out", str(ensemble), "--gans", "2", "--label-filter", "real"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((ensemble / "results.json").read_text())
    (run,) = results["shots"]["3"]["runs"]
    assert results["gans"] == 2 and "2 GANs per draw; real label filter" in proc.stdout
    assert [json.loads((ensemble / "k3-seed0" / name / "config.json").read_text())["config"]["seed"]
            for name in ("run", "run-1")] == [0, 1000]
    assert [g["synthetic_summary"]["images"] for g in run["gans"]] == [15, 15]
    assert [len(list((ensemble / "k3-seed0" / name).rglob("*.png"))) for name in ("synthetic", "synthetic-1")] == [15, 15]
    assert run["synthetic_images"] == round(run["label_filter_kept"] * 30) and 0 < run["label_filter_kept"] <= 1

    # --label-filter oracle on those two GANs (--fits-from reads both): the judge is trained on the test images;
    # the classifiers mix with a linear decay and finish on real images only.
    oracle = tmp_path / "oracle"
    proc = subprocess.run(base + ["--out", str(oracle), "--fits-from", str(ensemble), "--gans", "2",
                                  "--label-filter", "oracle", "--synthetic-schedule", "linear", "--real-finish", "0.5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((oracle / "results.json").read_text())
    assert (results["synthetic_schedule"], results["real_finish"]) == ("linear", 0.5)
    assert "synthetic share decays linearly to 0; last 50% of classifier steps real only" in proc.stdout
    (run,) = results["shots"]["3"]["runs"]
    assert [g["checkpoint"] for g in run["gans"]] == [
        g["checkpoint"] for g in json.loads((ensemble / "results.json").read_text())["shots"]["3"]["runs"][0]["gans"]]
    assert "oracle label filter kept" in proc.stderr and 0 < run["label_filter_kept"] <= 1


def test_bad_arguments_are_one_line_errors(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_fewshot.py"), "--fits-from", str(tmp_path),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: --fits-from needs an earlier run")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_fewshot.py"), "--ratios", "1.5",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: --ratios") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "bench_fewshot.py"), "--real-finish", "1",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: --real-finish") and "Traceback" not in proc.stderr
