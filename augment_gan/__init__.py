"""augment-gan: synthetic data augmentation for small image folders."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names loaded on first use (PEP 562), so `import augment_gan` does not import torch or
# albumentations; `from augment_gan import load_recipe` imports only what that name needs.
_LAZY = {
    "load_recipe": "augment_gan.recipes",
    "list_recipes": "augment_gan.recipes",
    "Recipe": "augment_gan.recipes",
    "SyntheticImageFolder": "augment_gan.datasets",
    "GeneratorDataset": "augment_gan.datasets",
    "MixedDataset": "augment_gan.mixing",
    "MixedSampler": "augment_gan.mixing",
    "DistributedMixedSampler": "augment_gan.mixing",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'augment_gan' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
