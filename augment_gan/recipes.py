"""Augmentation recipes: albumentations pipelines for real and synthetic images, plus the real:synthetic mix.

A recipe is a YAML file with four top-level keys:

    description: one line, shown by `augment-gan recipes list`
    mix:
      use_synthetic: true      # false: train on real images only
      synthetic_ratio: 0.25    # share of synthetic samples in every epoch and batch, in [0, 1)
    real: {__version__: ..., transform: {...}}   # exactly what `albumentations.to_dict`/`A.save` write
    synthetic: null            # optional: a different pipeline for synthetic images (null: same as real)

Recipes interoperate with albumentations both ways. Each pipeline is exactly a file `A.save(transform, path,
data_format="yaml")` writes, so `augment-gan recipes show NAME --part real` (`export_part`) gives a file that
`A.load(path, data_format="yaml")` reads; and `load_recipe` reads a file written by `A.save` as a recipe
whose real and synthetic images get that pipeline, with `DEFAULT_MIX`.

Each pipeline is a top-level `Compose` that ends with `Normalize` (or `ToFloat`) followed by `ToTensorV2`:
that tail turns the uint8 image into a float C×H×W tensor, and everything before it (the "image part")
keeps uint8 pixels, so `augment-gan merge` can write augmented images to disk with the same recipe.
Pipelines are built and seeded by `augment_gan.pipeline`.

Loading is strict, because a typo in an augmentation recipe silently changes an experiment: unknown keys,
transforms outside albumentations' own registry, unknown or invalid parameters, a transform without an
explicit `p`, and any warning albumentations raises while building are all a one-line `UserError`.
"""
from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from augment_gan.errors import UserError
from augment_gan.pipeline import PIPELINE_KEYS, build_pipeline, import_albumentations, seed_pipeline

RECIPE_KEYS = ("description", "mix", "real", "synthetic")
MIX_KEYS = ("use_synthetic", "synthetic_ratio")
PARTS = ("real", "synthetic")
DEFAULT_MIX = {"use_synthetic": True, "synthetic_ratio": 0.25}
"""The mix of a recipe loaded from a bare albumentations file: the `standard` recipe's (25% and 50% synthetic
gave the same few-shot gain within 0.3 pp, benchmarks/RESULTS.md; 25% costs fewer synthetic images)."""


# ----------------------------------------------------------------------------------------------------------
# Finding recipe files.

def _shipped_dir():
    return importlib.resources.files("augment_gan.recipe_files")


def list_recipes() -> list[str]:
    """Names of the recipes shipped with the package, sorted (e.g. `heavy`, `light`, `none`, `standard`)."""
    return sorted(entry.name[: -len(".yaml")] for entry in _shipped_dir().iterdir()
                  if entry.name.endswith(".yaml"))


def _looks_like_path(name_or_path: str | os.PathLike) -> bool:
    text = os.fspath(name_or_path)
    return (isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml", ".json")) or "/" in text
            or os.sep in text)


def read_recipe_text(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """Return (name, YAML text) of a shipped recipe name or a recipe file path."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        try:
            return path.stem, path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"recipe file not found: {path}") from None
        except (IsADirectoryError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read recipe file {path}: {exc}") from None
    name = str(name_or_path)
    shipped = list_recipes()
    if name not in shipped:
        raise UserError(f"unknown recipe {name!r}; shipped recipes: {', '.join(shipped)} (or give a path to a .yaml file)")
    return name, (_shipped_dir() / f"{name}.yaml").read_text(encoding="utf-8")



# ----------------------------------------------------------------------------------------------------------
# Recipes.

def _parse_mix(mix: Any, where: str) -> tuple[bool, float]:
    if not isinstance(mix, dict):
        raise UserError(f"{where}: 'mix' must be a mapping with {', '.join(MIX_KEYS)}")
    unknown = sorted(set(mix) - set(MIX_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) in mix: {', '.join(map(str, unknown))}; expected {', '.join(MIX_KEYS)}")
    missing = [k for k in MIX_KEYS if k not in mix]
    if missing:
        raise UserError(f"{where}: mix needs {', '.join(missing)}")
    use, ratio = mix["use_synthetic"], mix["synthetic_ratio"]
    if not isinstance(use, bool):
        raise UserError(f"{where}: mix.use_synthetic must be true or false, got {use!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        # 1.0 would mean no real images at all, and ratio/(1-ratio) synthetic per real image is infinite.
        raise UserError(f"{where}: mix.synthetic_ratio must be a number in [0, 1), got {ratio!r}")
    return use, float(ratio)


def is_albumentations_file(data: Any) -> bool:
    """Whether parsed YAML is a bare albumentations pipeline (`A.save`'s `{__version__, transform}`)."""
    return isinstance(data, dict) and "transform" in data and set(map(str, data)) <= set(PIPELINE_KEYS)


def parse_recipe(text: str, where: str = "recipe") -> dict[str, Any]:
    """Safe-load and check a recipe's YAML text; returns the raw mapping (pipelines are checked by building).

    A bare albumentations pipeline (a file `A.save` wrote) becomes a recipe with that pipeline for real
    and synthetic images and `DEFAULT_MIX`.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{where} is not valid YAML: {' '.join(str(exc).split())}") from None
    if is_albumentations_file(data):
        data = {"description": "an albumentations pipeline (albumentations.save), default mix",
                "mix": dict(DEFAULT_MIX), "real": data, "synthetic": None}
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a YAML mapping with keys {', '.join(RECIPE_KEYS)}, or a pipeline "
                        "written by albumentations.save")
    unknown = sorted(set(map(str, data)) - set(RECIPE_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {', '.join(RECIPE_KEYS)}")
    for key in ("description", "mix", "real"):
        if key not in data:
            raise UserError(f"{where}: missing '{key}'")
    if not isinstance(data["description"], str) or not data["description"].strip():
        raise UserError(f"{where}: 'description' must be a non-empty string")
    _parse_mix(data["mix"], where)
    return data


class Recipe:
    """One part (real or synthetic) of a recipe, as a torchvision-style `transform=` callable.

    `recipe(image)` takes a PIL image or a uint8 H×W / H×W×C ndarray and returns a float32 C×H×W tensor
    (grayscale stays one channel). `recipe.augment(image)` applies only the image part and returns uint8
    H×W×C; `recipe.to_tensor(image)` applies only the tail (use it for validation and test data).

    With `seed` set, two recipes loaded alike give the same pixels for the same sequence of calls. Inside
    `DataLoader` workers each worker re-seeds from (seed, the worker's torch seed), so workers do not repeat
    each other's augmentations and epochs differ; `torch.manual_seed` makes that reproducible too.
    """

    def __init__(self, name: str, data: dict[str, Any], part: str = "real", seed: int | None = None):
        if part not in PARTS:
            raise UserError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
        self.name = name
        self.description: str = data["description"].strip()
        self.use_synthetic, self.synthetic_ratio = _parse_mix(data["mix"], f"recipe {name}")
        self.part = part
        # A recipe without a `synthetic:` pipeline augments synthetic images like real ones.
        spec_part = part if data.get("synthetic") is not None else "real"
        self._data = data
        self._spec = data[spec_part]
        self.head, self.tail = build_pipeline(self._spec, f"recipe {name}: {spec_part}")
        other = "synthetic" if spec_part == "real" else "real"
        if data.get(other) is not None:
            build_pipeline(data[other], f"recipe {name}: {other}")  # strict: a broken part fails either way
        self.seed = seed if seed is not None else self.head.seed
        self._worker_seed: int | None = None
        self.reseed(self.seed)

    @property
    def ratio(self) -> float:
        """Share of synthetic samples to use: `synthetic_ratio`, or 0 when the recipe turns synthetic data off."""
        return self.synthetic_ratio if self.use_synthetic else 0.0

    def reseed(self, seed: int | None) -> None:
        """Restart the augmentation random stream (None: fresh entropy)."""
        self.seed = seed
        seed_pipeline(self.head, seed)

    def _worker_check(self) -> None:
        # A Compose copied into DataLoader workers carries the same random state into every worker, so
        # without this all workers would produce identical augmentations (and repeat them every epoch).
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            entropy = [info.seed] if self.seed is None else [self.seed, info.seed]
            seed_pipeline(self.head, int(np.random.SeedSequence(entropy).generate_state(1)[0]))

    @staticmethod
    def _as_array(image: Any) -> np.ndarray:
        """PIL image or ndarray -> uint8 H×W×C ndarray (C = 1 or 3)."""
        if hasattr(image, "mode") and hasattr(image, "convert"):  # PIL, without importing PIL here
            if image.mode not in ("L", "RGB"):
                # Same rule as torchvision's default loader; alpha is dropped, palettes expanded.
                image = image.convert("L" if image.mode in ("1", "I", "I;16", "F") else "RGB")
            array = np.asarray(image)
        elif isinstance(image, np.ndarray):
            array = image
        else:
            raise UserError(f"a recipe takes a PIL image or a uint8 numpy array, got {type(image).__name__} "
                            "(put the recipe first: it does the tensor conversion itself)")
        if array.dtype != np.uint8:
            raise UserError(f"a recipe takes uint8 pixels, got {array.dtype}")
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise UserError(f"a recipe takes an H×W or H×W×C image, got shape {array.shape}")
        return array

    def augment(self, image: Any) -> np.ndarray:
        """Apply the image part only: uint8 H×W×C in (PIL or ndarray), uint8 H×W×C out."""
        self._worker_check()
        out = self.head(image=self._as_array(image))["image"]
        return out[:, :, None] if out.ndim == 2 else out

    def to_tensor(self, image: Any):
        """Apply the tail only (no augmentation): float32 C×H×W tensor out."""
        return self.tail(image=self._as_array(image))["image"]

    def __call__(self, image: Any):
        """Augment and convert: float32 C×H×W tensor out."""
        return self.tail(image=self.augment(image))["image"]

    def _whole(self, spec: dict[str, Any], seed: int | None):
        # Fresh objects: a Compose re-seeds its children, so sharing them with self.head would reset its stream.
        A = import_albumentations()
        head, tail = build_pipeline(spec, f"recipe {self.name}")
        options = {k: v for k, v in spec["transform"].items() if k not in ("__class_fullname__", "transforms")}
        whole = A.Compose(list(head.transforms) + list(tail.transforms), **options)
        seed_pipeline(whole, seed)
        return whole

    @property
    def pipeline(self):
        """A fresh copy of the whole pipeline (image part + tail) as one albumentations `Compose`, seeded
        like this recipe was at load time; `A.to_dict(recipe.pipeline)` serialises it."""
        return self._whole(self._spec, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a mapping in the YAML layout, with both pipelines re-serialised by albumentations."""
        A = import_albumentations()
        out: dict[str, Any] = {"description": self.description,
                               "mix": {"use_synthetic": self.use_synthetic, "synthetic_ratio": self.synthetic_ratio}}
        for part in PARTS:
            spec = self._data.get(part)
            out[part] = None if spec is None else A.to_dict(self._whole(spec, None))
        return out

    def __repr__(self) -> str:
        return f"Recipe({self.name!r}, part={self.part!r}, seed={self.seed!r})"


def load_recipe(name_or_path: str | os.PathLike, *, part: str = "real", seed: int | None = None) -> Recipe:
    """Load a shipped recipe by name (`none`, `light`, `standard`, `heavy`) or a recipe YAML file by path.

    Returns a `Recipe`: a callable for torchvision's `transform=` (PIL image or uint8 ndarray in, float
    C×H×W tensor in [-1, 1] out for the shipped recipes). `part="synthetic"` selects the pipeline for
    synthetic images (the real one when the recipe has none). `seed` fixes the augmentation stream.
    A file written by `albumentations.save` (YAML or JSON) loads too, with `DEFAULT_MIX`; its pipeline
    must end with Normalize (or ToFloat) and ToTensorV2, like a recipe's.
    """
    name, text = read_recipe_text(name_or_path)
    data = parse_recipe(text, f"recipe {name}")
    return Recipe(name, data, part=part, seed=seed)


def check_recipe(name_or_path: str | os.PathLike) -> str:
    """Find and parse a recipe without building its pipelines (no albumentations import): the cheap check a
    command runs before any work. Returns its name; `load_recipe` still checks the pipelines in full."""
    name, text = read_recipe_text(name_or_path)
    parse_recipe(text, f"recipe {name}")
    return name


def export_part(name_or_path: str | os.PathLike, part: str = "real") -> str:
    """One pipeline of a recipe as YAML that `albumentations.load(path, data_format="yaml")` reads.

    `part="synthetic"` of a recipe without a synthetic pipeline gives the real one (what synthetic images
    get). The pipeline is checked first (`load_recipe`), so what is exported builds.
    """
    if part not in PARTS:
        raise UserError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    recipe = load_recipe(name_or_path, part=part)
    spec = recipe._spec
    which = part if recipe._data.get("synthetic") is not None or part == "real" else "real"
    header = (f"# {which} pipeline of recipe {recipe.name}{'' if which == part else ' (it has no synthetic one)'}, "
              "in albumentations' serialised form:\n# albumentations.load(path, data_format=\"yaml\") or "
              "augment_gan.load_recipe(path) reads it.\n")
    return header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
