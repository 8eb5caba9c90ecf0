"""Strict albumentations pipelines: which transforms a recipe may name, building a serialised pipeline into
its uint8 image part and tensor tail, and seeding it with one random stream.

A pipeline is albumentations' own serialised form, `{__version__, transform}`, exactly what `albumentations.to_dict`
and `A.save` write. Its top-level `Compose` ends with `Normalize` (or `ToFloat`) followed by `ToTensorV2`: that
tail turns the uint8 image into a float C×H×W tensor, and everything before it (the "image part") keeps uint8
pixels. Building is strict: transforms outside albumentations' own registry, unknown or invalid parameters, a
transform without an explicit `p`, and any warning albumentations raises are all a one-line `UserError`.
The recipe file format around pipelines (mix, real/synthetic parts) is `augment_gan.recipes`.
"""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import numpy as np

from augment_gan.errors import UserError

# albumentations checks PyPI for a newer version on every import (an HTTP request with a 2 s timeout).
# augment-gan never touches the network at run time, so turn that off unless the user chose otherwise.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PIPELINE_KEYS = ("__version__", "transform")

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


def import_albumentations():
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

    A = import_albumentations()
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
    A = import_albumentations()
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
