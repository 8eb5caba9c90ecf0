"""Feature extractors: uint8 N×H×W×C images -> float32 N×F features, one interface for every feature space.

Each feature space the package measures in is a `FeatureExtractor` (`extractor(images)`, `name`, `dim`,
and `embed` for N×C×H×W tensors) built by one function: `classifier_extractor` (the small CNN trained on
the labeled real images), `random_extractor` (the same CNN untrained), `inception_extractor` (FID's
Inception-v3, from a local weights file), `pixel_extractor` (area-downsampled pixels: synth's `--dedup`
space) and `discriminator_extractor` (a GAN discriminator's penultimate features: `evaluate --probe`).
Which network made the features changes every number computed on them (`augment_gan.metrics`), so
callers print `name` next to the results.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from augment_gan.errors import UserError


@dataclass(frozen=True)
class FeatureExtractor:
    """A named image embedding: `extractor(images)` maps uint8 N×H×W×C to float32 N×`dim`.

    `name` goes into every output so the numbers are read in context. `embed` is the same map on a uint8
    N×C×H×W tensor batch already on `device`, for callers that hold tensors (e.g. generator output).
    """

    name: str
    embed: Callable[[torch.Tensor], torch.Tensor]
    """uint8 N×C×H×W batch -> float N×F (called under `torch.inference_mode`)."""
    device: str = "cpu"
    dim: int | None = None
    """F, the feature length; None where it depends on the input (pixels of an unknown channel count)."""

    def __call__(self, images: np.ndarray, batch_size: int = 256, *, progress: bool = False) -> np.ndarray:
        """uint8 N×H×W×C -> float32 N×F; `progress` shows a tqdm bar on stderr (Inception on a CPU is slow)."""
        import sys

        from tqdm import tqdm

        from augment_gan.pixels import hwc_to_nchw

        out = []
        with torch.inference_mode(), tqdm(total=len(images), desc="features", unit="img", file=sys.stderr,
                                          disable=not progress, leave=False, dynamic_ncols=True) as bar:
            for start in range(0, len(images), batch_size):
                batch = hwc_to_nchw(images[start:start + batch_size]).to(self.device)
                out.append(self.embed(batch).float().cpu())
                bar.update(len(batch))
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim or 0), np.float32)


def classifier_extractor(images: np.ndarray, labels: np.ndarray, *, steps: int = 400, seed: int = 0,
                         device: str = "cpu", progress: Callable[[int, float], None] | None = None
                         ) -> FeatureExtractor:
    """Penultimate features of the small CNN from `augment_gan.classifier`, trained on labeled real images.

    The network learns what separates the user's classes, so distances reflect class-relevant content
    rather than pixel noise — the closest offline substitute for ImageNet Inception features. `progress`
    is called after every training step (see `train_classifier`).
    """
    from augment_gan.classifier import train_classifier
    from augment_gan.pixels import to_float

    model = train_classifier(images, labels, steps=steps, seed=seed, device=device,
                             progress=progress).to(device).eval()
    return FeatureExtractor(f"classifier-penultimate (trained on real, seed {seed}, {steps} steps)",
                            lambda x: model.features(to_float(x)), device, model.feature_dim)


def random_extractor(channels: int, *, seed: int = 0, device: str = "cpu") -> FeatureExtractor:
    """Features of the same small CNN at a fixed random initialisation (for unlabeled folders).

    Random convolutional features still separate textures and layouts, but are weaker than trained ones;
    the seed is fixed so numbers compare across runs of the same package version.
    """
    from augment_gan.classifier import SmallCNN
    from augment_gan.pixels import to_float

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(channels, num_classes=1).to(device).eval()
    return FeatureExtractor(f"random-cnn (untrained, seed {seed})", lambda x: model.features(to_float(x)), device,
                            model.feature_dim)


def require_inception() -> None:
    """Raise a one-line `UserError` unless the packages `--features inception` needs are installed."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3  # noqa: F401
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception wrapper is built on it)
    except ImportError:
        raise UserError("--features inception needs torch-fidelity: pip install 'augment-gan[inception]'") from None


def inception_extractor(weights_path: str | Path, *, device: str = "cpu") -> FeatureExtractor:
    """FID-compatible Inception-v3 pool features (2048-d) from a local weights file; never downloads.

    The weights are torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (the TensorFlow FID
    network converted to PyTorch); torch-fidelity must be installed (`pip install 'augment-gan[inception]'`).
    """
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path}")
    require_inception()
    from torchmetrics.image.fid import NoTrainInceptionV3
    # torch-fidelity calls torch.load without weights_only; load safely once first so a file holding
    # pickled code is refused before anything else reads it.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any failure means: not a plain weights file)
        raise UserError(f"cannot read Inception weights {path}: {str(exc).splitlines()[0]}") from None
    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path)).to(device)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path} is not an FID Inception-v3 weights file: {str(exc).splitlines()[0]}") from None

    def embed(x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # the network was trained on RGB
        return net(x)  # uint8 in, resized to 299 and normalised inside

    return FeatureExtractor(f"inception-v3-2048 ({path.name})", embed, device, 2048)


PIXEL_SIZE = 16
"""Side length of `pixel_extractor`'s features: small enough to ignore the high-frequency noise a generator
adds, large enough to tell digits and icons apart (synth's `--dedup` space)."""


def pixel_extractor(size: int = PIXEL_SIZE, *, channels: int | None = None, device: str = "cpu") -> FeatureExtractor:
    """The image itself, in [-1, 1] and area-downsampled to size×size (C·size² features).

    Scaled by 1/sqrt(C·size²), so the L2 distance between two images is their RMS pixel difference. A
    fixed space that no training moves, which is what a near-duplicate test needs: D's features change
    as it trains and are trained to ignore the augmentations applied to real images. `channels` only
    fills in `dim`; the features follow the input's channels.
    """
    import torch.nn.functional as F

    from augment_gan.pixels import to_float

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"pixel feature size must be a positive integer, got {size!r}")

    def embed(x: torch.Tensor) -> torch.Tensor:
        # adaptive_avg_pool2d averages whole pixel blocks (an area resize) when size divides the side.
        f = F.adaptive_avg_pool2d(to_float(x), size).flatten(1)
        return f / math.sqrt(f.shape[1])

    return FeatureExtractor(f"pixels-{size}x{size} (area-downsampled, RMS difference in [-1, 1])", embed, device,
                            None if channels is None else channels * size * size)


def discriminator_extractor(discriminator: str | Path | torch.nn.Module, *, name: str | None = None,
                            device: str = "cpu") -> FeatureExtractor:
    """A GAN discriminator's penultimate features (`D.features`, the flattened 4×4 trunk).

    `discriminator` is a run directory or checkpoint file (its trained D is loaded) or a D module (e.g. a
    random-init D, the floor a linear probe compares against). Images must be at D's resolution and
    channel count.
    """
    from augment_gan.pixels import to_float

    if isinstance(discriminator, torch.nn.Module):
        D, label = discriminator, name or "discriminator"
    else:
        from augment_gan.checkpoint import load_checkpoint

        ckpt = load_checkpoint(discriminator, device=device)
        D, label = ckpt.D, name or f"discriminator ({Path(ckpt.path).name})"
    D = D.to(device).eval()
    return FeatureExtractor(label, lambda x: D.features(to_float(x)), device, D.feature_dim)
