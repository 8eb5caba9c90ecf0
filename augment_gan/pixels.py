"""The one place where pixels change representation: uint8 [0, 255] <-> float [-1, 1].

Images on disk and in the cache are uint8 N×H×W×C (numpy); networks see float N×C×H×W in [-1, 1].
"""
from __future__ import annotations

import numpy as np
import torch


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W in [0, 255] -> float32 N×C×H×W in [-1, 1]."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float N×C×H×W in [-1, 1] -> uint8 N×C×H×W in [0, 255] (clamped, rounded to nearest)."""
    return x.detach().float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def hwc_to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 numpy N×H×W×C (or H×W×C) -> uint8 tensor N×C×H×W (a copy, safe for memmaps)."""
    # np.require copies read-only memmaps (torch refuses to wrap non-writable arrays) and nothing else.
    array = np.require(images, dtype=np.uint8, requirements=["C", "W"])
    if array.ndim == 3:
        array = array[None]
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def nchw_to_hwc(images: torch.Tensor) -> np.ndarray:
    """uint8 tensor N×C×H×W -> numpy N×H×W×C."""
    return images.permute(0, 2, 3, 1).cpu().numpy()
