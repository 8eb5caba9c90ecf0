"""Choosing the torch device: `auto` picks CUDA, then MPS, then the CPU; nothing is checked at import."""
from __future__ import annotations

from typing import TYPE_CHECKING

from augment_gan.errors import UserError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> "torch.device":
    """Return a usable `torch.device` for `name` (auto|cpu|cuda|cuda:N|mps), or raise `UserError`."""
    import torch  # imported here so that CLI modules can read DEVICE_CHOICES without loading torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise UserError("--device mps: MPS is not available on this machine (use --device cpu or auto)")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def pick_device(name: str = "auto") -> "torch.device":
    """`resolve_device`, and under torchrun (WORLD_SIZE > 1) a bare `cuda` becomes this rank's GPU (LOCAL_RANK)."""
    import os

    import torch

    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
