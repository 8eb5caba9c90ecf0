"""Sample grids: tile a batch of images into one PNG (written atomically)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from augment_gan.atomic import write_bytes_atomic
from augment_gan.pixels import nchw_to_hwc, to_uint8


def tile(images: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
    """uint8 N×H×W×C -> one uint8 image with `ncols` columns and `pad` white pixels between tiles."""
    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        out[y:y + h, x:x + w] = images[i]
    return out


def save_grid(images: torch.Tensor, ncols: int, path: Path) -> None:
    """Float N×C×H×W in [-1, 1] -> PNG grid at `path`."""
    array = tile(nchw_to_hwc(to_uint8(images)), ncols)
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    write_bytes_atomic(Path(path), buf.getvalue())
