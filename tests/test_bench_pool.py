"""The unlabeled-pool benchmark script: its draw, self-training's pseudo-labels, the summary's choice of the best
arm, and one short run end to end on a small real digit folder. Scores are only checked to be scores (quality
needs minutes of training; the benchmark itself is for measuring)."""
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
    return load_benchmark("bench_pool")


def test_draw_pool_keeps_the_test_set_out_of_the_pool_and_the_labeled_images_in_it(bench):
    labels = np.repeat(np.arange(3), 10)
    labeled, test, pool = bench.draw_pool(labels, 2, 3, seed=0)
    assert np.bincount(labels[labeled]).tolist() == [2, 2, 2] and np.bincount(labels[test]).tolist() == [3, 3, 3]
    assert not set(labeled) & set(test) and set(labeled) <= set(pool) and not set(test) & set(pool)
    assert sorted([*test, *pool]) == list(range(30))  # every image is in the test set or the pool
    assert np.array_equal(labeled, bench.draw_pool(labels, 2, 3, seed=0)[0])
    assert not np.array_equal(labeled, bench.draw_pool(labels, 2, 3, seed=1)[0])
    with pytest.raises(bench.UserError, match="class 0 has 10 images"):
        bench.draw_pool(labels, 4, 6, seed=0)  # no image left for the pool


def test_self_training_keeps_only_confident_predictions(bench):
    class Fixed(bench.torch.nn.Module):  # logits that depend on the first pixel only
        def __init__(self):
            super().__init__()
            self.unused = bench.torch.nn.Parameter(bench.torch.zeros(1))  # predict_confidence asks for a device

        def forward(self, x):
            first = x[:, 0, 0, 0]
            return bench.torch.stack([first * 10, -first * 10], dim=1)

    images = np.array([255, 0, 128, 129], np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2)
    keep, labels = bench.self_train_labels(Fixed(), images, 0.9)
    assert keep.tolist() == [0, 1] and labels.tolist() == [0, 1]  # 128 and 129 are near 0 in [-1, 1]: unsure


def test_the_best_arm_is_a_synthetic_one_and_the_target_needs_every_seed_positive(bench):
    def run(seed, real, **arms):
        return {"seed": seed, "arms": {"real": {"accuracy": real}, **{k: {"accuracy": v} for k, v in arms.items()}}}

    # self-train gains most, but it is the reference, not an augment-gan arm.
    runs = [run(0, 0.70, **{"vary@0.25": 0.75, "label-with@0.5": 0.73, "self-train": 0.90}),
            run(1, 0.72, **{"vary@0.25": 0.71, "label-with@0.5": 0.76, "self-train": 0.91})]
    s = bench.summarise({"runs": runs})
    assert s["best"]["arm"] == "label-with@0.5" and s["best"]["gain_pp"] == pytest.approx(3.5)
    assert s["best"]["every_seed_positive"] and s["best"]["target_met"]
    assert s["summary"]["vary@0.25"]["gain"]["runs"] == pytest.approx([0.05, -0.01])
    runs[1]["arms"]["label-with@0.5"]["accuracy"] = 0.715  # mean +2.25 pp, seed 1 negative
    s = bench.summarise({"runs": runs})
    assert s["best"]["arm"] == "vary@0.25" and not s["best"]["target_met"]


def test_short_run_writes_results_and_table(tmp_path: Path, shared_data: Path):
    data = copy_classes(shared_data / "mnist", tmp_path / "digits", 0, 12)
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCHMARKS / "bench_pool.py"), "--data-root", str(data), "--seeds", "0",
           "--labeled-per-class", "2", "--test-per-class", "3", "--fit-kimg", "0.032", "--synthetic", "40",
           "--classifier-steps", "10", "--batch-size", "16", "--threads", "1", "--ratios", "0.5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    run = results["runs"][0]
    assert run["labeled_images"] == 20 and run["test_images"] == 30 and run["pool_images"] == 90
    expected = {"real", "self-train", "vary@0.5", "label-with@0.5", "labels-fit@0.5",
                "self-train+vary@0.25", "self-train+label-with@0.25", "self-train+labels-fit@0.25"}
    assert set(run["arms"]) == expected
    assert all(0.0 <= a["accuracy"] <= 1.0 for a in run["arms"].values())
    for name, s in run["synthetic"].items():  # each set written by the product, labeled, the requested size
        assert s["images"] == 40 and sum(s["per_class"]) == 40, name
        assert (out / "seed0" / name / "manifest.jsonl").exists(), name
    assert 0.0 <= run["probe"]["trained_d"] <= 1.0 and 0.0 <= run["probe"]["random_d"] <= 1.0
    assert run["labels_run"]["of"] == 70  # the pool minus its 20 labeled images
    # No label leaks into the pool: flat, numbered files.
    assert all(p.is_file() and p.stem.isdigit() for p in (out / "seed0" / "pool").iterdir())
    assert results["best"]["arm"].split("@")[0] in {"vary", "label-with", "labels-fit"}
    table = (out / "table.md").read_text()
    assert "**real** (baseline)" in table and "probe: trained D" in table and proc.stdout.strip() == table.strip()

    # --fits-from: the same GANs (read only), other synthetic-set settings, no new fit.
    out2 = tmp_path / "out2"
    again = [*cmd[:-1], str(out2), "--fits-from", str(out), "--sets", "labels-fit", "--synthetic", "20"]
    proc = subprocess.run(again, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = json.loads((out2 / "results.json").read_text())["runs"][0]
    assert second["fits"]["labels"]["checkpoint"] == run["fits"]["labels"]["checkpoint"]
    assert "pool" not in second["fits"] and not (out2 / "seed0" / "run-labels").exists()
    assert second["synthetic"]["labels-fit"]["images"] == 20
    assert second["arms"]["real"]["accuracy"] == run["arms"]["real"]["accuracy"]  # same draw, same classifier
