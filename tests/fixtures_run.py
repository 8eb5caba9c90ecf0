"""Session fixtures for synth/vary tests: a really tiny trained run on real MNIST digits.

Test files load them with `pytest_plugins = ["fixtures_run"]` (conftest.py belongs to the data tests), so
one session trains once for every file.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Small networks keep a training step and a generator batch a few milliseconds on a CPU.
TINY_NETS = dict(g_channels=32, d_channels=8, min_channels=8, max_channels=32, z_dim=16)


def save_random_checkpoint(run_dir: Path, config, channels: int, classes: list[str],
                           data_root: Path | None = None) -> Path:
    """An untrained checkpoint written by the real checkpoint code (for layout tests and benchmarks)."""
    import torch

    from augment_gan.checkpoint import save_checkpoint
    from augment_gan.models import build_networks
    from augment_gan.runmeta import DataInfo, RunMeta

    torch.manual_seed(config.seed)
    conditional = bool(classes)
    g, d, e = build_networks(config, channels, len(classes))
    g_ema = build_networks(config, channels, len(classes))[0]
    g_ema.load_state_dict(g.state_dict())
    meta = RunMeta(config=config, conditional=conditional, classes=tuple(classes), channels=channels,
                   data=DataInfo(root=str(data_root) if data_root else "", classes=tuple(classes)))
    return save_checkpoint(run_dir, {"G": g, "G_ema": g_ema, "D": d, "E": e}, {}, {}, meta)


@pytest.fixture(scope="session")
def digits100(shared_data, tmp_path_factory) -> Path:
    """100 real MNIST digits, 10 per class, in an ImageFolder layout."""
    root = tmp_path_factory.mktemp("digits100")
    for d in range(10):
        (root / str(d)).mkdir()
        for f in sorted((shared_data / "mnist" / str(d)).iterdir())[:10]:
            shutil.copy(f, root / str(d) / f.name)
    return root


@pytest.fixture(scope="session")
def tiny_run(digits100, tmp_path_factory) -> Path:
    """A class-conditional run trained for 4 steps of 16 images at 32px; returns the run directory."""
    from augment_gan.config import TrainConfig
    from augment_gan.train import fit

    run = tmp_path_factory.mktemp("tiny-run")
    config = TrainConfig(resolution=32, kimg=0.064, minutes=None, batch_size=16, **TINY_NETS)
    fit(digits100, config, run, device="cpu", progress=False)
    return run


@pytest.fixture(scope="session")
def uncond_run(digits100, tmp_path_factory) -> Path:
    """An untrained unconditional checkpoint on the same digits (flat synthetic layout)."""
    from augment_gan.config import TrainConfig

    run = tmp_path_factory.mktemp("uncond-run")
    config = TrainConfig(resolution=32, kimg=0.1, minutes=None, batch_size=16, conditional=False, **TINY_NETS)
    save_random_checkpoint(run, config, 1, [], digits100)
    return run
