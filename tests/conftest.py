"""Shared fixtures: the real image sets in ../shared/data and an isolated dataset cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# CI clones the repository with ../shared beside it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding mnist/ and emoji-twitter/ (skips the test when it is missing)."""
    if not (SHARED_DATA / "mnist").is_dir() or not (SHARED_DATA / "emoji-twitter").is_dir():
        pytest.skip(f"real image sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Point the default dataset cache at a per-session temp folder, never the user's ~/.cache.

    Session-scoped so tests that load the same real folder decode it once.
    """
    saved = os.environ.get("AUGMENT_GAN_CACHE")
    os.environ["AUGMENT_GAN_CACHE"] = str(tmp_path_factory.mktemp("augment-gan-cache"))
    yield
    if saved is None:
        os.environ.pop("AUGMENT_GAN_CACHE", None)
    else:
        os.environ["AUGMENT_GAN_CACHE"] = saved
