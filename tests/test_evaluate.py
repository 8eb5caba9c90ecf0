"""`evaluate` on real digit folders: controlled cases (copies, fresh digits, noise), downstream, probe, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from augment_gan.checkpoint import load_checkpoint
from augment_gan.cli import app
from augment_gan.downstream import probe
from augment_gan.evaluate import EvaluateConfig, compute
from fakesynth import copy_classes, write_fake_synth
from fixtures_run import digits100, tiny_run  # noqa: F401  (session fixtures)

FAST = ["--feature-steps", "60"]  # enough for distinct features; the default 400 is for users


@pytest.fixture(autouse=True)
def _one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: more torch threads only thrash
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def folders(shared_data, tmp_path_factory):
    """real: 200 digits; fresh: a synth-style folder of 200 other digits (+20 marked rejected);
    copies: a synth-style folder holding the real images themselves; noise: 100 unlabeled noise images."""
    root = tmp_path_factory.mktemp("evaluate")
    mnist = shared_data / "mnist"
    real = copy_classes(mnist, root / "real", 0, 20)
    other = copy_classes(mnist, root / "other", 20, 42)
    fresh = write_fake_synth(other, root / "fresh", per_class=20, rejected_per_class=2)
    copies = write_fake_synth(real, root / "copies", per_class=20, rejected_per_class=0)
    noise = root / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(100):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(noise / f"{i:06d}.png")
    return {"real": real, "fresh": fresh, "copies": copies, "noise": noise}


def test_copies_of_real_images_are_memorised(folders):
    result = compute(folders["real"], folders["copies"], EvaluateConfig(feature_steps=60), progress=False,
                     log=lambda m: None).result
    assert result["features"]["name"].startswith("classifier-penultimate")
    assert result["memorisation"]["share"] == 1.0
    assert result["fd"] < 1e-6
    assert result["precision"] == result["recall"] == result["coverage"] == 1.0
    assert all(pair["flagged"] and pair["distance"] < 1e-6 for pair in result["memorisation"]["closest"])


def test_pixel_features_also_find_copies(folders):
    result = compute(folders["real"], folders["copies"], EvaluateConfig(features="pixels"), progress=False,
                     log=lambda m: None).result
    assert result["features"]["name"].startswith("pixels-16x16") and result["features"]["dim"] == 256
    assert result["memorisation"]["share"] == 1.0 and result["fd"] < 1e-6


def test_cli_json_on_fresh_digits(folders):
    res = CliRunner().invoke(app, ["evaluate", "--real", str(folders["real"]), "--synthetic",
                                   str(folders["fresh"]), "--json", *FAST])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["synthetic"]["images"] == 200  # the 20 images the manifest marks rejected are left out
    assert result["resolution"] == 32  # the synthetic images are 28px
    assert result["memorisation"]["share"] < 0.1
    assert 0 < result["fd"] < 3 * result["fd_real_halves"]  # fresh real digits: near the real-vs-real floor
    assert result["precision"] > 0.5 and result["recall"] > 0.5
    assert result["kid"]["subset_size"] == 200
    assert result["downstream"] is None and result["probe"] is None


def test_noise_is_far_from_digits(folders):
    result = compute(folders["real"], folders["noise"], EvaluateConfig(features="random"), progress=False,
                     log=lambda m: None).result
    assert result["features"]["name"] == "random-cnn (untrained, seed 0)"
    assert result["fd"] > 20 * result["fd_real_halves"]
    assert result["precision"] < 0.05 and result["coverage"] < 0.05
    assert result["memorisation"]["share"] == 0.0


def test_downstream_tiny_budget_and_out_files(folders, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--real", str(folders["real"]), "--synthetic", str(folders["fresh"]), *FAST,
            "--downstream", "--seeds", "2", "--steps", "8", "--batch-size", "16", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "real + synthetic" in res.stdout and "gain" in res.stdout and "Fréchet distance" in res.stdout

    result = json.loads((out / "metrics.json").read_text())
    d = result["downstream"]
    assert d["seeds"] == 2 and d["steps"] == 8 and d["recipe"] == "standard"
    assert d["synthetic_ratio"] == 0.25  # the standard recipe's mix
    assert d["n_train"] + d["n_test"] == 200 and d["n_synthetic"] == 200
    for arm in ("real_only", "real_plus_synthetic"):
        assert len(d[arm]["runs"]) == 2 and all(0 <= a <= 1 for a in d[arm]["runs"])
    gains = np.subtract(d["real_plus_synthetic"]["runs"], d["real_only"]["runs"])
    assert d["gain"]["mean"] == pytest.approx(gains.mean())

    pairs = Image.open(out / "pairs.png")
    assert pairs.size == (16 * 34 + 2, 2 * 34 + 2)  # 16 columns × (synthetic, real) rows of 32px tiles

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1
    assert "exists; pass --overwrite" in again.output and "Traceback" not in again.output


def test_misuse_is_a_one_line_error(folders, tmp_path):
    runner = CliRunner()
    base = ["evaluate", "--real", str(folders["real"])]
    res = runner.invoke(app, [*base, "--synthetic", str(folders["fresh"]), "--features", "inception"])
    assert res.exit_code == 1 and "--inception-weights" in res.output
    res = runner.invoke(app, [*base, "--synthetic", str(folders["noise"]), "--downstream"])
    assert res.exit_code == 1 and "no class subfolders" in res.output
    odd = write_fake_synth(folders["real"], tmp_path / "odd", classes=["3"], per_class=3, rejected_per_class=0)
    (odd / "3").rename(odd / "three")
    res = runner.invoke(app, [*base, "--synthetic", str(odd), "--downstream"])
    assert res.exit_code == 1 and "three" in res.output and "not classes of the real folder" in res.output
    res = runner.invoke(app, ["evaluate", "--real", str(folders["noise"]), "--synthetic", str(folders["fresh"]),
                              "--features", "classifier"])
    assert res.exit_code == 1 and "two class subfolders" in res.output


def test_probe_reports_trained_and_random_discriminator(tiny_run, digits100):  # noqa: F811
    result = probe(tiny_run, digits100, EvaluateConfig(probe_steps=50), log=lambda m: None)
    assert result["n_train"] + result["n_test"] == 100 and result["classes"] == 10
    assert result["feature_dim"] == load_checkpoint(tiny_run).D.feature_dim
    for key in ("trained_d", "random_d"):
        assert 0.0 <= result[key] <= 1.0
    assert len(result["digest"]) == 64
