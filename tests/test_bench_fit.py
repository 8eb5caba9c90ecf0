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
    cmd = [sys.executable, str(BENCHMARKS / "bench_fit.py"), "--datasets", f"digits={digits}",
           "--minutes", "0.03", "--samples", "100", "--classifier-steps", "15", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert "| dataset | model | kimg (steps) | FD ↓ | FD / DCGAN FD | final p |" in proc.stdout
    assert "| digits | dcgan |" in proc.stdout and "| digits | default |" in proc.stdout
    assert "real-vs-real floor FD" in proc.stdout and "test accuracy" in proc.stdout

    results = json.loads((out / "results.json").read_text())
    ds = results["datasets"]["digits"]
    assert ds["images"] == 72 and ds["channels"] == 1 and ds["classes"] == ["0", "1", "7"]
    assert 0.0 <= ds["classifier"]["test_accuracy"] <= 1.0
    assert list(ds["models"]) == ["dcgan", "default"]
    dcgan, default = ds["models"]["dcgan"], ds["models"]["default"]
    for r in (dcgan, default):
        assert r["steps"] >= 1 and math.isfinite(r["fd"])
        # A GAN trained for seconds is far from the data; two halves of the real set are not.
        assert r["fd"] > ds["floor"]["fd"]
        grid = Image.open(out / r["grid"])
        assert grid.size == (8 * 34 + 2, 8 * 34 + 2)  # 64 of the 100 samples, 32px tiles + 2px gaps
    assert dcgan["fd_ratio"] is None
    assert default["fd_ratio"] == pytest.approx(default["fd"] / dcgan["fd"])
    assert 0.0 <= default["ada_p"] <= 1.0 and default["overrides"] == {}
    assert Path(default["checkpoint"]).is_file()
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


def test_model_selection(bench):
    args = bench.parse_args([])
    assert bench.resolve_models(args) == ["dcgan", "default"]
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
