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

Loading is strict, because a typo in an augmentation recipe silently changes an experiment: unknown keys,
transforms outside albumentations' own registry, unknown or invalid parameters, a transform without an
explicit `p`, and any warning albumentations raises while building are all a one-line `UserError`.
"""
from __future__ import annotations

import importlib.resources
import inspect
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from augment_gan.errors import UserError

# albumentations checks PyPI for a newer version on every import (an HTTP request with a 2 s timeout).
# augment-gan never touches the network at run time, so turn that off unless the user chose otherwise.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

RECIPE_KEYS = ("description", "mix", "real", "synthetic")
MIX_KEYS = ("use_synthetic", "synthetic_ratio")
PIPELINE_KEYS = ("__version__", "transform")
PARTS = ("real", "synthetic")
DEFAULT_MIX = {"use_synthetic": True, "synthetic_ratio": 0.25}
"""The mix of a recipe loaded from a bare albumentations file: the `standard` recipe's (25% and 50% synthetic
gave the same few-shot gain within 0.3 pp, benchmarks/RESULTS.md; 25% costs fewer synthetic images)."""

# Transforms that end a pipeline: they leave uint8 image space, so they may only appear in the tail.
_TO_FLOAT = ("Normalize", "ToFloat")
_TENSOR = ("ToTensorV2",)
_LEAVE_UINT8 = _TO_FLOAT + _TENSOR + ("FromFloat", "ToTensor3D")

# Registered albumentations classes that cannot work in a recipe applied as `pipeline(image=...)` alone:
# they need extra inputs (reference images, overlay metadata, bounding boxes or masks), read files named
# in the recipe (TextImage's font), or work on 3-D volumes. Rejecting them at load time beats a KeyError
# in the middle of the first epoch.
_NOT_FOR_RECIPES = frozenset({
    "FDA", "HistogramMatching", "PixelDistributionAdaptation", "TemplateTransform", "OverlayElements",
    "TextImage", "Mosaic", "RandomCropNearBBox", "BBoxSafeRandomCrop", "RandomSizedBBoxSafeCrop",
    "AtLeastOneBBoxRandomCrop", "CropNonEmptyMaskIfExists", "MaskDropout", "ConstrainedCoarseDropout",
    "CenterCrop3D", "RandomCrop3D", "Pad3D", "PadIfNeeded3D", "CoarseDropout3D", "CubicSymmetry", "ToTensor3D",
    "ReplayCompose",
})


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
# Building albumentations pipelines strictly.

def _albumentations():
    # Imported lazily: albumentations pulls in cv2 and pydantic, which `import augment_gan` should not pay for.
    import albumentations as A
    import albumentations.pytorch  # noqa: F401  (registers ToTensorV2)

    return A


def allowed_transforms() -> dict[str, type]:
    """Albumentations classes a recipe may name: concrete, public, registered for serialisation by
    albumentations itself (never a class from another module), and usable on a lone image."""
    from albumentations.core.composition import BaseCompose
    from albumentations.core.serialization import SERIALIZABLE_REGISTRY
    from albumentations.core.transforms_interface import BasicTransform

    A = _albumentations()
    allowed = {}
    for name, cls in SERIALIZABLE_REGISTRY.items():
        if not cls.__module__.startswith("albumentations.") or name in _NOT_FOR_RECIPES:
            continue
        if name.startswith(("_", "Base")) or inspect.isabstract(cls):
            continue
        # Only the names albumentations exports; base classes such as DualTransform are registered too.
        exported = getattr(A, name, None) is cls or getattr(A.pytorch, name, None) is cls
        if exported and issubclass(cls, (BasicTransform, BaseCompose)) and cls not in (
                BasicTransform, A.DualTransform, A.ImageOnlyTransform):
            allowed[name] = cls
    return allowed


def _one_line(exc: BaseException) -> str:
    # albumentations re-raises pydantic's ValidationError as a multi-line ValueError; the structured
    # errors are on the cause. Name each bad parameter once, with its first complaint.
    for candidate in (exc, exc.__cause__, exc.__context__):
        errors = getattr(candidate, "errors", None)
        if callable(errors):
            try:
                by_field: dict[str, str] = {}
                for error in errors():
                    field = str(error["loc"][0]) if error["loc"] else "value"
                    by_field.setdefault(field, error["msg"])
                return "; ".join(f"{field}: {msg}" for field, msg in by_field.items())
            except Exception:  # noqa: BLE001 - fall back to the plain message
                break
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _build_node(node: Any, where: str, allowed: dict[str, type]):
    """Build one serialised transform (a `{'__class_fullname__': ..., ...}` mapping), recursively.

    Mirrors `albumentations.from_dict`, which does the same walk, but checks each class against the
    registry before anything is instantiated and names the failing node in the error.
    """
    from albumentations.core.composition import BaseCompose
    from albumentations.core.serialization import shorten_class_name

    if not isinstance(node, dict):
        raise UserError(f"{where}: expected a transform mapping with __class_fullname__, got {type(node).__name__}")
    full = node.get("__class_fullname__")
    if not isinstance(full, str):
        raise UserError(f"{where}: missing __class_fullname__")
    name = shorten_class_name(full)
    cls = allowed.get(name)
    if cls is None:
        raise UserError(f"{where}: unknown transform {full!r}; a recipe may use only albumentations' registered "
                        "image transforms (see albumentations' documentation)")
    where = f"{where} ({name})"
    args = {k: v for k, v in node.items() if k != "__class_fullname__"}
    is_compose = issubclass(cls, BaseCompose)
    if not is_compose and "p" not in args:
        # albumentations would warn and use p=0.5, which silently halves e.g. Normalize.
        raise UserError(f"{where}: give an explicit probability p")
    if is_compose:
        children = args.get("transforms")
        if not isinstance(children, list):
            raise UserError(f"{where}: 'transforms' must be a list")
        args["transforms"] = [_build_node(child, f"{where}.transforms[{i}]", allowed) for i, child in enumerate(children)]
    elif "transforms" in args:
        raise UserError(f"{where}: unknown parameter 'transforms'")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transform = cls(**args)
    except (TypeError, ValueError, KeyError) as exc:
        raise UserError(f"{where}: {_one_line(exc)}") from None
    invalid = getattr(transform, "invalid_args", None)
    if invalid:
        raise UserError(f"{where}: unknown parameter(s) {', '.join(invalid)}")
    if caught:
        # A recipe should build cleanly; deprecations today are load failures after the next upgrade.
        raise UserError(f"{where}: {_one_line(caught[0].message)}")
    return transform


def _contains(transform, names: tuple[str, ...]) -> str | None:
    from albumentations.core.composition import BaseCompose

    if type(transform).__name__ in names:
        return type(transform).__name__
    if isinstance(transform, BaseCompose):
        for child in transform.transforms:
            found = _contains(child, names)
            if found:
                return found
    return None


def build_pipeline(spec: Any, where: str = "pipeline"):
    """Build a full recipe pipeline from albumentations' serialisation format, strictly.

    `spec` is `{'__version__': ..., 'transform': {...}}` as written by `albumentations.to_dict`. Returns
    (head, tail): two `Compose`s, the uint8 image part and the Normalize + ToTensorV2 tail.
    """
    A = _albumentations()
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected albumentations' serialised form {{__version__, transform}}")
    unknown = sorted(set(spec) - set(PIPELINE_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; expected {', '.join(PIPELINE_KEYS)}")
    if "transform" not in spec:
        raise UserError(f"{where}: missing 'transform'")
    top = spec["transform"]
    if not isinstance(top, dict) or top.get("__class_fullname__") != "Compose":
        raise UserError(f"{where}: the top-level transform must be a Compose")
    compose = _build_node(top, where, allowed_transforms())
    transforms = list(compose.transforms)
    names = [type(t).__name__ for t in transforms]
    if len(names) < 2 or names[-2] not in _TO_FLOAT or names[-1] not in _TENSOR:
        raise UserError(f"{where}: the pipeline must end with Normalize (or ToFloat) and ToTensorV2, "
                        f"so that it returns a float C×H×W tensor; it ends with {names[-2:] or 'nothing'}")
    for t in transforms[-2:]:
        if t.p < 1:
            raise UserError(f"{where}: {type(t).__name__} at the end of the pipeline needs p: 1.0")
    for i, t in enumerate(transforms[:-2]):
        found = _contains(t, _LEAVE_UINT8)
        if found:
            raise UserError(f"{where}.transforms[{i}]: {found} may only appear at the end of the pipeline "
                            "(the image part must keep uint8 pixels)")
    if compose.p < 1:
        raise UserError(f"{where}: the top-level Compose needs p: 1.0 (otherwise the tensor conversion is skipped)")
    # The head keeps the Compose's own options (p, seed, ...); the tail is deterministic.
    options = {k: v for k, v in top.items() if k not in ("__class_fullname__", "transforms")}
    head = A.Compose(transforms[:-2], **options)
    tail = A.Compose(transforms[-2:])
    return head, tail


def seed_pipeline(compose, seed: int | None) -> None:
    """Seed an albumentations Compose so that all its transforms draw from ONE random stream.

    `Compose(seed=s)` in albumentations 2.0.8 gives every child transform its own generator seeded with
    the same s, so their draws coincide: with p=0.5 and p=0.3 transforms, the second one applies only when
    the first does. One shared stream keeps the transforms independent and the result reproducible.
    """
    import random

    compose.set_random_seed(seed)  # records .seed on every node
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


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
        A = _albumentations()
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
        A = _albumentations()
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
