"""Session fixtures for synth/vary tests: a really tiny trained run on real MNIST digits.

Imported with `pytest_plugins = ["tests.fixtures_run"]`-style plain imports from the test files that need
it (conftest.py belongs to the data tests).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

# Small networks keep a training step and a generator batch a few milliseconds on a CPU.
TINY_NETS = dict(g_channels=32, d_channels=8, min_channels=8, max_channels=32, z_dim=16)


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
    """A class-conditional run trained for 0.2 kimg (13 steps of 16) at 32px; returns the run directory."""
    from augment_gan.config import TrainConfig
    from augment_gan.train import fit

    run = tmp_path_factory.mktemp("tiny-run")
    config = TrainConfig(resolution=32, kimg=0.2, minutes=None, batch_size=16, **TINY_NETS)
    fit(digits100, config, run, device="cpu", progress=False)
    return run


@pytest.fixture(scope="session")
def tiny_uncond_run(digits100, tmp_path_factory) -> Path:
    """The same tiny training, unconditional (flat synthetic layout)."""
    from augment_gan.config import TrainConfig
    from augment_gan.train import fit

    run = tmp_path_factory.mktemp("tiny-uncond-run")
    config = TrainConfig(resolution=32, kimg=0.1, minutes=None, batch_size=16, conditional=False, **TINY_NETS)
    fit(digits100, config, run, device="cpu", progress=False)
    return run
