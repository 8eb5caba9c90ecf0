"""Long-tailed folders: `synth --balance`, `vary --interpolate --balance` and class-balanced training draws."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from augment_gan.checkpoint import load_checkpoint
from augment_gan.cli import app
from augment_gan.config import TrainConfig
from augment_gan.datasets import SyntheticImageFolder
from augment_gan.errors import UserError
from augment_gan.manifest import MANIFEST, read_manifest
from augment_gan.objective import BatchLayout, draw_step, sampling_weights
from augment_gan.plan import balance_counts
from augment_gan.runmeta import RunMeta
from augment_gan.synth import SynthConfig, synth
from augment_gan.vary import VaryConfig, latent_partners, vary

pytest_plugins = ["fixtures_run"]  # digits100 (session-scoped)

COUNTS = {"0": 8, "1": 4, "2": 2, "3": 1}
"""A long tail of real digits, down to a class of a single image."""


@pytest.fixture(scope="module")
def longtail(digits100, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("longtail")
    for c, n in COUNTS.items():
        (root / c).mkdir()
        for f in sorted((digits100 / c).iterdir())[:n]:
            shutil.copy(f, root / c / f.name)
    return root


@pytest.fixture(scope="module")
def longtail_run(longtail, tmp_path_factory) -> Path:
    """A conditional run trained for 4 steps on the long-tailed folder (it records the class counts)."""
    from augment_gan.train import fit
    from fixtures_run import TINY_NETS

    run = tmp_path_factory.mktemp("longtail-run")
    fit(longtail, TrainConfig(resolution=32, kimg=0.064, minutes=None, batch_size=16, **TINY_NETS), run,
        device="cpu", progress=False)
    return run


def per_class(folder: Path) -> dict[str, int]:
    return {c.name: len(list(c.glob("*.png"))) for c in sorted(folder.iterdir()) if c.is_dir()}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------------
# synth --balance

def test_balance_counts_fill_each_class_to_the_largest():
    classes = ["a", "b", "c"]
    assert balance_counts((10, 4, 1), classes, None, None) == (0, 6, 9)
    assert balance_counts((10, 4, 1), classes, None, 5) == (0, 1, 4)
    assert balance_counts((10, 4, 1), classes, ("c",), None) == (9,)  # N is still the largest class overall
    with pytest.raises(UserError, match="nothing to write"):
        balance_counts((10, 4, 1), classes, None, 1)
    with pytest.raises(UserError, match="does not record"):
        balance_counts((), classes, None, None)
    with pytest.raises(UserError, match="unconditional"):
        balance_counts((), [], None, None)


def test_synth_balance_writes_what_each_class_lacks(longtail_run, longtail, tmp_path):
    assert RunMeta.from_json((sorted((longtail_run / "checkpoints").glob("ckpt-*.json"))[-1]).read_text()
                             ).data.class_counts == (8, 4, 2, 1)
    out = tmp_path / "bal"
    summary = synth(longtail_run, out, balance=True, progress=False)
    assert summary.images == 4 + 6 + 7
    assert per_class(out) == {"1": 4, "2": 6, "3": 7}  # no empty folder for the largest class
    settings = json.loads((out / "synth.json").read_text())
    assert settings["counts"] == [0, 4, 6, 7] and settings["balance"] == {"to": None, "training_counts": [8, 4, 2, 1]}
    rows = read_manifest(out / MANIFEST)
    assert all(r.file.startswith(f"{r.class_name}/") for r in rows)

    # Read next to the real folder: labels aligned, no warning about the class that needs no images.
    from torchvision.datasets import ImageFolder
    real = ImageFolder(longtail)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = SyntheticImageFolder(out, class_to_idx=real.class_to_idx)
    assert sorted(set(ds.targets)) == [1, 2, 3]
    assert [real.targets.count(c) + ds.targets.count(c) for c in range(4)] == [8, 8, 8, 8]

    # The same command again finds everything done; the bytes are a pure function of the options.
    again = synth(longtail_run, out, balance=True, progress=False)
    assert again.written == 0 and again.existing == again.images == 17
    other = tmp_path / "bal2"
    synth(longtail_run, other, balance=True, progress=False)
    assert tree(out) == tree(other)

    up = synth(longtail_run, tmp_path / "to5", balance=True, balance_to=5, classes=("0", "2", "3"), progress=False)
    assert per_class(tmp_path / "to5") == {"2": 3, "3": 4} and up.images == 7


def test_synth_balance_errors(longtail_run, tiny_run, uncond_run, tmp_path):
    with pytest.raises(UserError, match="without --n"):
        SynthConfig(balance=True, n=10)
    with pytest.raises(UserError, match="needs --balance"):
        SynthConfig(n=10, balance_to=5)
    with pytest.raises(UserError, match="unconditional"):
        synth(uncond_run, tmp_path / "u", balance=True, progress=False)
    # A balanced folder (10 per class) needs nothing; the error comes before anything is created.
    with pytest.raises(UserError, match="nothing to write"):
        synth(tiny_run, tmp_path / "t", balance=True, progress=False)
    assert not (tmp_path / "t").exists()

    runner = CliRunner()
    result = runner.invoke(app, ["synth", str(longtail_run), "--balance", "--n", "5", "--out", str(tmp_path / "c")])
    assert result.exit_code != 0 and "without --n" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()
    result = runner.invoke(app, ["synth", str(longtail_run), "--balance", "--balance-to", "3", "--out",
                                 str(tmp_path / "ok"), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 1 + 2 and per_class(tmp_path / "ok") == {"2": 1, "3": 2}


# ------------------------------------------------------------------------------------------------------
# vary --interpolate --balance

def test_latent_partners_are_nearest_of_the_same_class():
    mu = torch.tensor([[0.0], [1.0], [5.0], [0.5], [9.0]])
    partners = latent_partners(mu, ["a", "a", "a", "b", "c"], 1)
    assert partners == [[1], [0], [1], [3], [4]]  # b and c are alone: themselves
    assert sorted(latent_partners(mu, ["a", "a", "a", "b", "c"], 5)[0]) == [1, 2]


def test_vary_interpolate_balance_fills_each_class(longtail_run, longtail, tmp_path):
    ckpt = load_checkpoint(longtail_run)
    out = tmp_path / "interp"
    summary = vary(ckpt, longtail, out, VaryConfig(interpolate=True, balance=True, progress=False))
    assert per_class(out) == {"1": 4, "2": 6, "3": 7} and summary.per_class == {"1": 4, "2": 6, "3": 7}
    assert summary.per_source is None and summary.images == 17
    rows = read_manifest(out / MANIFEST)
    assert sorted(r.index for r in rows) == list(range(17))
    for r in rows:
        assert Path(r.source).parent.name == Path(r.partner).parent.name == r.class_name  # same class
        assert 0.0 <= r.mix <= 1.0 and r.sigma == 0.25
    # Sources take turns within a class: class 2 (2 images) gives each source 3 images.
    assert sorted(Path(r.file).name for r in rows if r.class_name == "2") == sorted(
        f"{Path(f).stem}_{k}.png" for f in (p.name for p in (longtail / "2").iterdir()) for k in range(3))
    # The one image of class 3 is its own partner: its images vary by the noise alone, and they differ.
    threes = [np.asarray(Image.open(out / r.file)) for r in rows if r.class_name == "3"]
    assert all(r.partner == r.source for r in rows if r.class_name == "3")
    assert len({a.tobytes() for a in threes}) == len(threes)

    # Deterministic: another folder gets the same bytes; the same command resumes with nothing to do.
    vary(ckpt, longtail, tmp_path / "again", VaryConfig(interpolate=True, balance=True, progress=False))
    assert {k: v for k, v in tree(out).items() if k != "vary.json"} == \
        {k: v for k, v in tree(tmp_path / "again").items() if k != "vary.json"}
    redo = vary(ckpt, longtail, out, VaryConfig(interpolate=True, balance=True, progress=False))
    assert redo.written == 0 and redo.existing == 17


def test_vary_interpolate_without_balance_and_errors(longtail_run, longtail, tmp_path):
    ckpt = load_checkpoint(longtail_run)
    summary = vary(ckpt, longtail, tmp_path / "n2", VaryConfig(interpolate=True, n=2, progress=False))
    assert summary.images == 2 * sum(COUNTS.values()) and summary.per_source == 2
    with pytest.raises(UserError, match="without --n"):
        VaryConfig(balance=True, n=3)
    with pytest.raises(UserError, match="needs --balance"):
        VaryConfig(balance_to=3)
    one = tmp_path / "flat"
    one.mkdir()
    shutil.copy(next((longtail / "1").iterdir()), one / "a.png")
    shutil.copy(next((longtail / "2").iterdir()), one / "b.png")
    with pytest.raises(UserError, match="labeled source folder"):
        vary(load_checkpoint(longtail_run), one, tmp_path / "x", VaryConfig(balance=True, progress=False))
    result = CliRunner().invoke(app, ["vary", str(longtail_run), str(longtail), "--interpolate", "--balance",
                                      "--balance-to", "2", "--out", str(tmp_path / "cli"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert per_class(tmp_path / "cli") == {"3": 1}
    result = CliRunner().invoke(app, ["vary", str(longtail_run), str(longtail), "--balance", "--balance-to", "1",
                                      "--out", str(tmp_path / "none")])
    assert result.exit_code != 0 and "nothing to write" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------------------------------
# class_sampling: how a conditional fit draws a long-tailed folder

def test_sampling_weights_follow_the_power_of_the_class_sizes():
    labels = torch.tensor([0] * 100 + [1] * 4)
    assert sampling_weights(labels, 1.0) is None
    assert sampling_weights(torch.tensor([0, 0, 1, 1]), 0.5) is None  # equal classes: uniform draws unchanged
    assert sampling_weights(None, 0.5) is None
    w = sampling_weights(labels, 0.5)
    share = w[labels == 1].sum() / w.sum()
    assert share == pytest.approx(2 / (10 + 2))  # sqrt(4) / (sqrt(100) + sqrt(4))
    w0 = sampling_weights(labels, 0.0)
    assert w0[labels == 1].sum() / w0.sum() == pytest.approx(0.5)


def test_weighted_draws_give_reals_and_fake_labels_the_same_class_mix():
    labels = torch.tensor([0] * 96 + [1] * 4)
    config = TrainConfig(resolution=32, batch_size=64, class_sampling=0.0)
    layout = BatchLayout.build(64, 0, 1, config.selfsup_fraction)
    gen = torch.Generator().manual_seed(0)
    weights = sampling_weights(labels, config.class_sampling)
    real, fake = [], []
    for _ in range(50):
        d = draw_step(gen, layout, config, 0.0, len(labels), labels, paired=False, weights=weights)
        real.append(labels[d.idx])
        fake.append(d.y_fake)
    real_share, fake_share = torch.cat(real).float().mean(), torch.cat(fake).float().mean()
    assert abs(real_share - 0.5) < 0.05 and abs(fake_share - 0.5) < 0.05  # uniform draws would give 0.04


def test_checkpoints_without_class_sampling_resume_the_old_way(longtail_run):
    path = sorted((longtail_run / "checkpoints").glob("ckpt-*.json"))[-1]
    data = json.loads(path.read_text())
    assert data["config"]["class_sampling"] == 0.5
    del data["config"]["class_sampling"]
    assert RunMeta.from_dict(data).config.class_sampling == 1.0
