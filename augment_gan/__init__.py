"""augment-gan: synthetic data augmentation for small image folders.

The Python API mirrors the command line, one function per command, each with its config class::

    import augment_gan as ag

    ckpt = ag.fit("examples/digits", ag.TrainConfig(minutes=2), "runs/digits")      # augment-gan fit
    ag.synth(ckpt, "synthetic/digits", n=1000)                                     # augment-gan synth
    ag.evaluate("examples/digits", "synthetic/digits")                             # augment-gan evaluate

`vary`, `merge`, `report`, `inspect` and `augment` (all of the above, measured) follow the same pattern; the
torchvision-facing datasets (`SyntheticImageFolder`, `SyntheticTarDataset`, `GeneratorDataset`,
`MixedDataset`) and `load_recipe` are here too. Each function's docstring is its reference.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module, attribute), loaded on first use (PEP 562), so `import augment_gan` imports
# neither torch nor albumentations, and `from augment_gan import load_recipe` only what that name needs.
_LAZY: dict[str, tuple[str, str]] = {
    # Commands and their configs.
    "fit": ("augment_gan.train", "fit"),
    "TrainConfig": ("augment_gan.config", "TrainConfig"),
    "LabelerConfig": ("augment_gan.pseudolabel", "LabelerConfig"),
    "synth": ("augment_gan.synth", "synth"),
    "SynthConfig": ("augment_gan.synth", "SynthConfig"),
    "vary": ("augment_gan.vary", "vary"),
    "VaryConfig": ("augment_gan.vary", "VaryConfig"),
    "evaluate": ("augment_gan.evaluate", "evaluate"),
    "EvaluateConfig": ("augment_gan.evaluate", "EvaluateConfig"),
    "merge": ("augment_gan.merge", "merge_folders"),
    "report": ("augment_gan.report", "write_report"),
    "inspect": ("augment_gan.data", "inspect_folder"),
    "augment": ("augment_gan.augment", "augment"),
    "AugmentConfig": ("augment_gan.augment", "AugmentConfig"),
    # Reading folders and checkpoints.
    "ReadOptions": ("augment_gan.decode", "ReadOptions"),
    "load_folder": ("augment_gan.data", "load_folder"),
    "load_checkpoint": ("augment_gan.checkpoint", "load_checkpoint"),
    # Recipes and torchvision datasets.
    "load_recipe": ("augment_gan.recipes", "load_recipe"),
    "list_recipes": ("augment_gan.recipes", "list_recipes"),
    "Recipe": ("augment_gan.recipes", "Recipe"),
    "SyntheticImageFolder": ("augment_gan.datasets", "SyntheticImageFolder"),
    "SyntheticTarDataset": ("augment_gan.tardataset", "SyntheticTarDataset"),
    "GeneratorDataset": ("augment_gan.datasets", "GeneratorDataset"),
    "MixedDataset": ("augment_gan.mixing", "MixedDataset"),
    "MixedSampler": ("augment_gan.mixing", "MixedSampler"),
    "DistributedMixedSampler": ("augment_gan.mixing", "DistributedMixedSampler"),
    "UserError": ("augment_gan.errors", "UserError"),
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:  # type checkers see the real objects; at run time they load lazily
    from augment_gan.augment import AugmentConfig as AugmentConfig
    from augment_gan.augment import augment as augment
    from augment_gan.checkpoint import load_checkpoint as load_checkpoint
    from augment_gan.config import TrainConfig as TrainConfig
    from augment_gan.data import inspect_folder as inspect  # noqa: F401 (public name, in __all__)
    from augment_gan.data import load_folder as load_folder
    from augment_gan.datasets import GeneratorDataset as GeneratorDataset
    from augment_gan.datasets import SyntheticImageFolder as SyntheticImageFolder
    from augment_gan.decode import ReadOptions as ReadOptions
    from augment_gan.errors import UserError as UserError
    from augment_gan.evaluate import EvaluateConfig as EvaluateConfig
    from augment_gan.evaluate import evaluate as evaluate
    from augment_gan.merge import merge_folders as merge  # noqa: F401
    from augment_gan.mixing import DistributedMixedSampler as DistributedMixedSampler
    from augment_gan.mixing import MixedDataset as MixedDataset
    from augment_gan.mixing import MixedSampler as MixedSampler
    from augment_gan.pseudolabel import LabelerConfig as LabelerConfig
    from augment_gan.recipes import Recipe as Recipe
    from augment_gan.recipes import list_recipes as list_recipes
    from augment_gan.recipes import load_recipe as load_recipe
    from augment_gan.report import write_report as report  # noqa: F401
    from augment_gan.synth import SynthConfig as SynthConfig
    from augment_gan.synth import synth as synth
    from augment_gan.tardataset import SyntheticTarDataset as SyntheticTarDataset
    from augment_gan.train import fit as fit
    from augment_gan.vary import VaryConfig as VaryConfig
    from augment_gan.vary import vary as vary


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'augment_gan' has no attribute {name!r}")
    value = getattr(importlib.import_module(target[0]), target[1])
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps `augment_gan.synth` (and every other API name) the function, whatever is imported first.

    Importing a submodule binds it to the attribute of the same name on its package: after
    `import augment_gan.synth`, `augment_gan.synth` would be the module, not the function. The API
    names win; the submodules stay importable (`from augment_gan.synth import SynthConfig`) through
    `sys.modules`.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
