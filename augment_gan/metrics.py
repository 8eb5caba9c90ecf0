"""Sample-quality metrics on feature arrays (FD, KID, precision/recall, density/coverage, memorisation)
and the feature extractors that produce those arrays from uint8 images.

The metric functions are pure: they take two float arrays N×F (real, synthetic) and return numbers.
Which network made the features changes every number, so each extractor carries a `name` that callers
print next to the results; only `inception` features with the FID-compatible weights give numbers
comparable to published FID/KID.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from augment_gan.errors import UserError

K_NEAREST = 5
"""k of the k-NN manifolds: Kynkäänniemi et al. 2019 use k=3, Naeem et al. 2020 recommend k=5 for
density/coverage; one k for all four keeps them comparable."""

MAX_MANIFOLD_SAMPLES = 5000
"""Precision/recall/density/coverage subsample each set to this size: the N×M distance matrix of
5,000 × 5,000 float32 is 100 MB, and the estimates are already stable there (Naeem et al. 2020, fig. 4)."""

MEMORISATION_PERCENTILE = 1.0
"""A synthetic image counts as memorised when it is closer to a real image than this percentile of the
real set's own nearest-neighbour distances: closer than 99% of real images are to each other."""

_CHUNK = 1024  # rows of a distance matrix computed at once (keeps memory at ~4 MB per 1,000 columns)


# ----------------------------------------------------------------------------------------------------
# Distribution distances (torchmetrics).


def _torchmetrics_image():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError:
        raise UserError("FD/KID need torchmetrics: pip install 'augment-gan[metrics]'") from None
    return FrechetInceptionDistance, KernelInceptionDistance


class _Precomputed(torch.nn.Module):
    """Identity "feature extractor" so torchmetrics' FID/KID run on features we computed ourselves."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_tensor(features: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if t.ndim != 2:
        raise ValueError(f"{name} features must be N×F, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} features contain NaN or inf")
    return t.float()


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets N×F and M×F (FID's formula).

    Computed by torchmetrics in float64. Needs at least 2 samples per set; with fewer samples than
    feature dimensions the covariances are singular and the value is biased upwards (Chong & Forsyth
    2020), so compare numbers only at equal set sizes.
    """
    FID, _ = _torchmetrics_image()
    r, f = _as_tensor(real, "real"), _as_tensor(fake, "synthetic")
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature sizes differ: {r.shape[1]} vs {f.shape[1]}")
    if len(r) < 2 or len(f) < 2:
        raise UserError("the Fréchet distance needs at least 2 images in each set")
    metric = FID(feature=_Precomputed(r.shape[1]))
    metric.update(r.double(), real=True)
    metric.update(f.double(), real=False)
    return max(float(metric.compute()), 0.0)  # tiny negative values are float round-off of 0


def kid_subset_size(n_real: int, n_fake: int) -> int:
    """KID subset size: the standard 1,000, or the smaller set's size for small folders."""
    return min(1000, n_real, n_fake)


def kernel_distance(real: np.ndarray, fake: np.ndarray, *, subset_size: int | None = None,
                    subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """Kernel (Inception) distance: mean and std over `subsets` random subsets of the unbiased
    polynomial-kernel MMD² (Bińkowski et al. 2018), via torchmetrics. Unbiased, so it can dip
    slightly below 0 when the sets match. `subset_size` defaults to `kid_subset_size`."""
    _, KID = _torchmetrics_image()
    r, f = _as_tensor(real, "real"), _as_tensor(fake, "synthetic")
    size = subset_size or kid_subset_size(len(r), len(f))
    if size < 2:
        raise UserError("KID needs at least 2 images in each set")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "KID keeps all features in memory": we chose that
        metric = KID(feature=_Precomputed(r.shape[1]), subsets=subsets, subset_size=size)
    metric.update(r.double(), real=True)
    metric.update(f.double(), real=False)
    # torchmetrics draws subsets with the global torch RNG; fork it so results depend on `seed` only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# ----------------------------------------------------------------------------------------------------
# k-NN manifolds.


def _subsample(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    if len(x) <= n:
        return x
    return x[torch.randperm(len(x), generator=generator)[:n]]


def _kth_neighbour_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row (the ball radius of the k-NN manifold)."""
    if len(x) <= k:
        raise UserError(f"k-NN metrics need more than k={k} images per set, got {len(x)}")
    out = torch.empty(len(x))
    for start in range(0, len(x), _CHUNK):
        d = torch.cdist(x[start:start + _CHUNK], x)
        # Row i's smallest distance is 0 (itself), so the k-th neighbour is the (k+1)-th smallest.
        out[start:start + _CHUNK] = d.kthvalue(k + 1, dim=1).values
    return out


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, *, k: int = K_NEAREST,
                                      max_samples: int = MAX_MANIFOLD_SAMPLES,
                                      seed: int = 0) -> dict[str, float]:
    """k-NN manifold metrics of a synthetic feature set against a real one.

    precision: share of synthetic samples inside the real manifold (a union of balls reaching each real
      sample's k-th nearest real neighbour) — fidelity (Kynkäänniemi et al. 2019);
    recall: share of real samples inside the synthetic manifold — diversity (same paper);
    density: how many real balls contain each synthetic sample, divided by k; ≈1 when the sets match,
      robust to real outliers (Naeem et al. 2020);
    coverage: share of real balls that contain at least one synthetic sample (same paper).
    Each set is subsampled to `max_samples` (seeded) to bound memory.
    """
    g = torch.Generator().manual_seed(seed)
    r = _subsample(_as_tensor(real, "real"), max_samples, g)
    f = _subsample(_as_tensor(fake, "synthetic"), max_samples, g)
    r_radius = _kth_neighbour_radius(r, k)
    f_radius = _kth_neighbour_radius(f, k)

    in_real = torch.zeros(len(f), dtype=torch.bool)
    balls_containing = torch.zeros(len(f))
    real_covered = torch.zeros(len(r), dtype=torch.bool)
    real_in_fake = torch.zeros(len(r), dtype=torch.bool)
    for start in range(0, len(f), _CHUNK):
        d = torch.cdist(f[start:start + _CHUNK], r)  # synthetic chunk × real
        inside = d <= r_radius[None, :]
        in_real[start:start + _CHUNK] = inside.any(dim=1)
        balls_containing[start:start + _CHUNK] = inside.sum(dim=1).float()
        real_covered |= inside.any(dim=0)
        real_in_fake |= (d <= f_radius[start:start + _CHUNK, None]).any(dim=0)
    return {
        "precision": float(in_real.float().mean()),
        "recall": float(real_in_fake.float().mean()),
        "density": float(balls_containing.mean() / k),
        "coverage": float(real_covered.float().mean()),
    }


# ----------------------------------------------------------------------------------------------------
# Memorisation.


@dataclass(frozen=True)
class Memorisation:
    """Nearest real neighbour of every synthetic sample, and which ones count as copies."""

    share: float
    """Share of synthetic samples at or below `threshold` from their nearest real sample."""
    threshold: float
    """The `percentile`-th percentile of the real set's own nearest-neighbour distances."""
    percentile: float
    nearest: np.ndarray
    """int64 M: index of each synthetic sample's nearest real sample."""
    distance: np.ndarray
    """float32 M: distance to it."""
    flagged: np.ndarray
    """bool M: distance <= threshold."""


def _nearest(query: torch.Tensor, base: torch.Tensor, *, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dist, idx = torch.empty(len(query)), torch.empty(len(query), dtype=torch.long)
    for start in range(0, len(query), _CHUNK):
        d = torch.cdist(query[start:start + _CHUNK], base)
        if exclude_self:
            rows = torch.arange(len(d))
            d[rows, rows + start] = float("inf")
        dist[start:start + _CHUNK], idx[start:start + _CHUNK] = d.min(dim=1)
    return dist, idx


def memorisation(real: np.ndarray, fake: np.ndarray, *,
                 percentile: float = MEMORISATION_PERCENTILE) -> Memorisation:
    """Flag synthetic samples that sit closer to a real sample than real samples sit to each other.

    The threshold is relative to the real set's own spacing, so it means the same in any feature space.
    The comparison is `<=`: when the real set holds exact duplicates the threshold is 0, and only exact
    copies are flagged. A fresh sample from the real distribution is flagged with probability ≈
    `percentile`/100.
    """
    r, f = _as_tensor(real, "real"), _as_tensor(fake, "synthetic")
    if len(r) < 2:
        raise UserError("memorisation needs at least 2 real images")
    real_nn, _ = _nearest(r, r, exclude_self=True)
    threshold = float(torch.quantile(real_nn.double(), percentile / 100.0))
    dist, idx = _nearest(f, r, exclude_self=False)
    flagged = dist <= threshold
    return Memorisation(share=float(flagged.float().mean()), threshold=threshold, percentile=percentile,
                        nearest=idx.numpy(), distance=dist.numpy(), flagged=flagged.numpy())


# ----------------------------------------------------------------------------------------------------
# Feature extractors: uint8 N×H×W×C images -> float32 N×F features.


@dataclass(frozen=True)
class FeatureExtractor:
    """A named image embedding. `name` goes into every output so the numbers are read in context."""

    name: str
    embed: Callable[[torch.Tensor], torch.Tensor]
    """uint8 N×C×H×W batch -> float N×F (called under `torch.inference_mode`)."""
    device: str = "cpu"

    def __call__(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """uint8 N×H×W×C -> float32 N×F."""
        from augment_gan.pixels import hwc_to_nchw

        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = hwc_to_nchw(images[start:start + batch_size]).to(self.device)
                out.append(self.embed(batch).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def classifier_extractor(images: np.ndarray, labels: np.ndarray, *, steps: int = 400, seed: int = 0,
                         device: str = "cpu") -> FeatureExtractor:
    """Penultimate features of the small CNN from `augment_gan.classifier`, trained on labeled real images.

    The network learns what separates the user's classes, so distances reflect class-relevant content
    rather than pixel noise — the closest offline substitute for ImageNet Inception features.
    """
    from augment_gan.classifier import train_classifier
    from augment_gan.pixels import to_float

    model = train_classifier(images, labels, steps=steps, seed=seed, device=device).to(device).eval()
    return FeatureExtractor(f"classifier-penultimate (trained on real, seed {seed}, {steps} steps)",
                            lambda x: model.features(to_float(x)), device)


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
    return FeatureExtractor(f"random-cnn (untrained, seed {seed})", lambda x: model.features(to_float(x)), device)


def inception_extractor(weights_path: str | Path, *, device: str = "cpu") -> FeatureExtractor:
    """FID-compatible Inception-v3 pool features (2048-d) from a local weights file; never downloads.

    The weights are torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` (the TensorFlow FID
    network converted to PyTorch); torch-fidelity must be installed (`pip install torch-fidelity`).
    """
    path = Path(weights_path)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path}")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception wrapper is built on it)
    except ImportError:
        raise UserError("--features inception needs torchmetrics and torch-fidelity: "
                        "pip install 'augment-gan[metrics]' torch-fidelity") from None
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

    return FeatureExtractor(f"inception-v3-2048 ({path.name})", embed, device)


# ----------------------------------------------------------------------------------------------------
# Linear probe.


def linear_probe(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, *,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic regression trained on frozen features (a linear probe).

    Features are standardised with the training set's statistics; full-batch Adam for `steps` steps
    converges on a few thousand samples; a small L2 penalty keeps it from fitting noise when there are
    more feature dimensions than training images.
    """
    x_tr, x_te = _as_tensor(train, "train"), _as_tensor(test, "test")
    y_tr = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    y_te = torch.as_tensor(np.asarray(test_labels), dtype=torch.long)
    mean, std = x_tr.mean(0, keepdim=True), x_tr.std(0, keepdim=True).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(x_tr.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x_tr), y_tr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((head(x_te).argmax(1) == y_te).float().mean())
