"""A small CNN classifier for 28–64px images: the yardstick behind `evaluate --downstream`, the
classifier-feature extractor of the metrics, and the few-shot benchmark.

It is deliberately plain (three conv stages, batch norm, global pooling) so that a gain from synthetic
data reflects the data, not a clever model, and so that it trains on a CPU in seconds.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from augment_gan.errors import UserError
from augment_gan.pixels import hwc_to_nchw, to_float


class SmallCNN(nn.Module):
    """conv(w) → pool → conv(2w) → pool → conv(4w) ×2 → global average → fc(4w) = features → logits.

    Float N×C×H×W in [-1, 1] in; any H, W ≥ 8 (global pooling makes it size-agnostic).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, dropout: float = 0.2):
        super().__init__()
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *block(in_channels, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), *block(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.ReLU(inplace=True))
        self.feature_dim = 4 * width
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations N×(4·width): the input of the last linear layer."""
        return self.hidden(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _check_images(images: np.ndarray, labels: np.ndarray, what: str) -> None:
    if images.ndim != 4 or images.dtype != np.uint8:
        raise UserError(f"{what} images must be uint8 N×H×W×C, got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise UserError(f"{what}: {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise UserError(f"{what}: no images")


def _batch(images: np.ndarray, idx: np.ndarray, recipe: Callable[..., Any] | None) -> torch.Tensor:
    """uint8 N×H×W×C rows `idx` -> float N×C×H×W in [-1, 1], each row through `recipe` when given."""
    if recipe is None:
        return to_float(hwc_to_nchw(images[idx]))
    if hasattr(recipe, "augment"):
        # An augment_gan.recipes.Recipe: use only its uint8 image part and convert pixels here, so
        # training and evaluation images are normalised by the same function whatever the recipe's tail.
        return to_float(hwc_to_nchw(np.stack([recipe.augment(np.ascontiguousarray(images[i])) for i in idx])))
    # Any other torchvision-style transform: uint8 H×W×C in, float C×H×W in [-1, 1] out.
    return torch.stack([torch.as_tensor(recipe(np.ascontiguousarray(images[i]))) for i in idx]).float()


SCHEDULES = ("constant", "linear")


def synthetic_count(step: int, steps: int, n_extra: int, schedule: str, real_finish: float) -> int:
    """Synthetic images in the batch of optimizer step `step` (0-based) of `steps`.

    The last round(`real_finish` · `steps`) steps have none; before them `constant` gives `n_extra` every
    step and `linear` decays from `n_extra` at step 0 towards 0 at the end of the mixed steps.
    """
    mixed_steps = steps - int(round(real_finish * steps))
    if step >= mixed_steps:
        return 0
    if schedule == "linear":
        return int(round(n_extra * (1 - step / mixed_steps)))
    return n_extra


def train_classifier(images: np.ndarray, labels: np.ndarray, *, steps: int = 500, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0, recipe: Callable[..., Any] | None = None,
                     extra: tuple[np.ndarray, np.ndarray] | None = None, synthetic_ratio: float = 0.5,
                     extra_recipe: Callable[..., Any] | None = None, synthetic_schedule: str = "constant",
                     real_finish: float = 0.0,
                     num_classes: int | None = None, width: int = 16, weight_decay: float = 5e-4,
                     device: str | torch.device = "cpu",
                     progress: Callable[[int, float], None] | None = None) -> SmallCNN:
    """Train a `SmallCNN` on uint8 N×H×W×C images with int labels; returns it in eval mode on the CPU.

    extra: optional (images, labels) — synthetic data. Every batch then holds round(`synthetic_ratio` ·
      `batch_size`) extra images and the rest real ones, so a real-only and a real+synthetic model take
      the same number of optimizer steps and see the same number of real images per step up to the ratio.
    recipe: applied to every real training image, never to evaluation images; an
      `augment_gan.recipes.Recipe` (its image part is used) or a transform returning float C×H×W in [-1, 1].
    extra_recipe: applied to the extra images (default: `recipe`), e.g. `load_recipe(name, part="synthetic")`.
    synthetic_schedule, real_finish: how the share of extra images changes over training (`synthetic_count`):
      `constant` (default) or `linear` decay, and the share of the last steps trained on real images only
      (default 0). Measured on few-shot digits, neither beat the constant mix (benchmarks/RESULTS.md).
    Deterministic for a given seed on the CPU; the caller's global RNG state is left untouched.
    AdamW with a linear warm-up (5% of steps) then cosine decay — robust across 100–10,000 images
    without tuning per size. With recipes (or none), batch k+1 is drawn and augmented on a second thread
    while the model trains on batch k: albumentations costs about a third of a 32 px CPU step.
    """
    labels = np.asarray(labels, dtype=np.int64)
    _check_images(images, labels, "training")
    if steps < 1 or batch_size < 2:
        raise UserError(f"steps must be >= 1 and batch size >= 2, got {steps} and {batch_size}")
    n_extra = 0
    if extra is not None:
        extra_images, extra_labels = extra[0], np.asarray(extra[1], dtype=np.int64)
        _check_images(extra_images, extra_labels, "synthetic")
        if extra_images.shape[1:] != images.shape[1:]:
            raise UserError(f"synthetic images are {extra_images.shape[1:]} but real ones {images.shape[1:]} (H×W×C)")
        if not 0.0 <= synthetic_ratio < 1.0:
            raise UserError(f"synthetic ratio must be in [0, 1), got {synthetic_ratio}")
        if synthetic_schedule not in SCHEDULES:
            raise UserError(f"synthetic schedule must be one of {', '.join(SCHEDULES)}, got {synthetic_schedule!r}")
        if not 0.0 <= real_finish < 1.0:
            raise UserError(f"real finish must be in [0, 1), got {real_finish}")
        n_extra = int(round(synthetic_ratio * batch_size))
        if n_extra == 0:
            extra = None
    num_classes = num_classes or int(max(labels.max(), extra[1].max() if extra is not None else 0)) + 1
    device = torch.device(device)
    extra_recipe = extra_recipe if extra_recipe is not None else recipe
    # Albumentations pipelines draw from their own RNG, not torch's; the two streams get distinct seeds.
    if recipe is not None and hasattr(recipe, "reseed"):
        recipe.reseed(seed)
    if extra_recipe is not None and extra_recipe is not recipe and hasattr(extra_recipe, "reseed"):
        extra_recipe.reseed(seed + 1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        model = SmallCNN(images.shape[3], num_classes, width=width).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

        def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            # Called once per step, in step order: the draws are the same on either thread.
            n_step = synthetic_count(step, steps, n_extra, synthetic_schedule, real_finish) if extra is not None else 0
            idx = rng.integers(0, len(images), batch_size - n_step)
            x, y = _batch(images, idx, recipe), torch.from_numpy(labels[idx])
            if n_step:
                jdx = rng.integers(0, len(extra[0]), n_step)
                x = torch.cat([x, _batch(extra[0], jdx, extra_recipe)])
                y = torch.cat([y, torch.from_numpy(extra[1][jdx])])
            return x, y

        # Recipes draw from their own generators; any other transform may draw from torch's global one,
        # which dropout uses too, so a second thread would make the run depend on thread timing.
        ahead = all(r is None or hasattr(r, "augment") for r in (recipe, extra_recipe))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifier-batches") as pool:
            pending = pool.submit(make_batch, 0) if ahead else None
            for step in range(steps):
                if pending is not None:
                    x, y = pending.result()
                    pending = pool.submit(make_batch, step + 1) if step + 1 < steps else None
                else:
                    x, y = make_batch(step)
                loss = F.cross_entropy(model(x.to(device)), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if progress is not None:
                    progress(step + 1, loss.detach().item())
    return model.cpu().eval()


@torch.inference_mode()
def predict(model: SmallCNN, images: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Predicted class indices (int64 N) for uint8 N×H×W×C images."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(to_float(hwc_to_nchw(images[s:s + batch_size])).to(device)).argmax(dim=1).cpu()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


@torch.inference_mode()
def predict_confidence(model: SmallCNN, images: np.ndarray, *, batch_size: int = 512
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class indices int64 N, their softmax probability float32 N) for uint8 N×H×W×C images."""
    model.eval()
    device = next(model.parameters()).device
    labels, confidence = [], []
    for s in range(0, len(images), batch_size):
        p = model(to_float(hwc_to_nchw(images[s:s + batch_size])).to(device)).float().softmax(dim=1).cpu()
        best = p.max(dim=1)
        labels.append(best.indices)
        confidence.append(best.values)
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return torch.cat(labels).numpy(), torch.cat(confidence).numpy()


def accuracy(model: SmallCNN, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of `model` on uint8 N×H×W×C images."""
    labels = np.asarray(labels, dtype=np.int64)
    _check_images(images, labels, "test")
    return float((predict(model, images, batch_size=batch_size) == labels).mean())


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), the same share of every class in the test set (at least one image
    per class on each side when the class has two or more images)."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
