"""The fit benchmark script: a seconds-long run on a few real digits end to end, plus its argument checks
and the DCGAN reference's shapes. Scores are not asserted beyond sanity (timing and quality vary by
machine); the benchmark itself is for measuring."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchscripts import BENCHMARKS, load_benchmark
from fakesynth import copy_classes


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_fit")


@pytest.fixture()
def digits(tmp_path: Path, shared_data: Path) -> Path:
    """3 classes × 24 real mnist digits: enough for a classifier split and a few GAN steps."""
    return copy_classes(shared_data / "mnist", tmp_path / "digits", 0, 24, classes=("0", "1", "7"))


def test_short_run_writes_table_results_and_grids(tmp_path: Path, digits: Path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCHMARKS / "bench_fit.py"), "--datasets", f"digits={digits}", "--seeds", "0,1",
           "--minutes", "0.03", "--samples", "100", "--classifier-steps", "15", "--threads", "1",
           "--variants", "dcgan,dcgan-b32,default", "--curve-minutes", "0.005", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert "| dataset | seed | model | steps | img/s | FD ↓ | KID ×10³ ↓ | FD / best DCGAN | final p |" in proc.stdout
    for seed in (0, 1):
        for model in ("dcgan", "dcgan-b32", "default"):
            assert f"| digits | {seed} | {model} |" in proc.stdout
    assert "real-vs-real floor FD" in proc.stdout and "test accuracy" in proc.stdout
    assert "each model alone" in proc.stdout and "FD by step" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    assert results["clock"] == "wall" and results["seeds"] == [0, 1]
    assert [(r["dataset"], r["seed"]) for r in results["runs"]] == [("digits", 0), ("digits", 1)]
    run = results["runs"][0]
    assert run["images"] == 72 and run["channels"] == 1 and run["classes"] == ["0", "1", "7"]
    assert 0.0 <= run["classifier"]["test_accuracy"] <= 1.0
    assert list(run["models"]) == ["dcgan", "dcgan-b32", "default"]
    dcgan, b32, default = (run["models"][m] for m in ("dcgan", "dcgan-b32", "default"))
    assert dcgan["batch_size"] == 64 and b32["batch_size"] == 32
    for r in (dcgan, b32, default):
        assert r["steps"] >= 1 and math.isfinite(r["fd"]) and math.isfinite(r["kid"]) and r["img_per_s"] > 0
        # A GAN trained for seconds is far from the data; two halves of the real set are not.
        assert r["fd"] > run["floor"]["fd"]
        grid = Image.open(out / r["grid"])
        assert grid.size == (8 * 34 + 2, 8 * 34 + 2)  # 64 of the 100 samples, 32px tiles + 2px gaps
    best = min(("dcgan", "dcgan-b32"), key=lambda m: run["models"][m]["fd"])
    assert run["best_dcgan"] == best
    assert default["fd_ratio"] == pytest.approx(default["fd"] / run["models"][best]["fd"])
    assert 0.0 <= default["ada_p"] <= 1.0 and default["overrides"] == {}
    assert Path(default["checkpoint"]).is_file()
    # The curve scores every checkpoint of the run, the last one being the final model.
    curve = default["curve"]
    assert len(curve) >= 1 and curve[-1]["step"] == default["steps"] and curve[-1]["fd"] == pytest.approx(default["fd"])
    assert (out / "table.md").read_text().strip() in proc.stdout


def test_bad_arguments_are_one_line_errors(bench, tmp_path: Path, digits: Path, capsys):
    assert bench.main(["--variants", "dcgan,bogus", "--datasets", f"d={digits}", "--out", str(tmp_path / "a")]) == 1
    assert capsys.readouterr().err.strip().startswith("Error: unknown variant(s) bogus")
    assert bench.main(["--datasets", "cifar", "--out", str(tmp_path / "b")]) == 1
    assert "unknown dataset 'cifar'" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "results.json").write_text("{}")
    assert bench.main(["--datasets", f"d={digits}", "--out", str(busy)]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert (busy / "results.json").read_text() == "{}"
    assert bench.main(["--datasets", f"d={digits}", "--seeds", "a", "--out", str(tmp_path / "c")]) == 1
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err


def test_model_selection(bench):
    args = bench.parse_args([])
    assert bench.resolve_models(args) == ["dcgan", "dcgan-b32", "default"]
    assert bench.resolve_models(bench.parse_args(["--ablations"])) == list(bench.MODELS)
    assert bench.resolve_models(bench.parse_args(["--ablations", "--variants", "diffaug-off,default"])) == [
        "diffaug-off", "default"]
    # Every variant really changes the default in each field it names (no silent no-op rows).
    default = bench.TrainConfig()
    for name, overrides in bench.VARIANTS.items():
        changed = {k for k, v in overrides.items() if getattr(default, k) != v}
        assert changed == set(overrides) and bool(changed) == (name != "default"), name


def test_dcgan_reference_shapes_and_sampling():
    ref = load_benchmark("dcgan_reference")
    G, D = ref.Generator(3), ref.Discriminator(3)
    z = torch.randn(5, ref.NZ, 1, 1)
    x = G(z)
    assert x.shape == (5, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (5,)
    data = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (10, 1, 32, 32), dtype=np.uint8))
    G1, stats = ref.train(data, minutes=1e-9, batch_size=4)  # the budget check runs before each step
    assert stats["steps"] == 0
    a = ref.sample(G1, 10, seed=3, batch_size=8)  # not a multiple of the batch: the last one is trimmed
    b = ref.sample(G1, 10, seed=3, batch_size=8)
    assert a.dtype == torch.uint8 and a.shape == (10, 1, 32, 32)
    assert torch.equal(a, b)
