"""Sample-quality metrics on feature arrays (FD, KID, precision/recall, density/coverage, memorisation).

The arrays come from the extractors in `augment_gan.features` (one interface for every feature space).

The metric functions are pure: they take two float arrays N×F (real, synthetic) and return numbers.
Which network made the features changes every number, so each extractor carries a `name` that callers
print next to the results; only `inception` features with the FID-compatible weights give numbers
comparable to published FID/KID.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

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
        raise UserError("FD/KID need torchmetrics, a dependency of augment-gan: pip install torchmetrics") from None
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
# Memorisation: the nearest real neighbour, shared by `evaluate` and `synth --dedup`.


def is_copy(distance, threshold: float):
    """The one rule for "this sample copies a real one": its distance to the nearest real sample <= threshold.

    `<=` rather than `<`: when the real set holds exact duplicates its percentile threshold is 0, and `<`
    would then flag nothing, not even pixel-exact copies; `<=` flags exactly those. For any other threshold
    the two differ only on an exact tie. Works on floats, numpy arrays and tensors.
    """
    return distance <= threshold


def nearest_neighbours(query: torch.Tensor, base: torch.Tensor, *, exclude: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query row's nearest base row (Euclidean), float M and int64 M.

    `exclude[i]`: a base row query i may not match (itself, when the query rows are base rows). Squared
    distances by matmul find the neighbour fast; the distance itself is then recomputed exactly, so an exact
    copy measures 0 rather than matmul round-off (which `is_copy` with a threshold of 0 relies on).
    """
    dist, idx = torch.empty(len(query)), torch.empty(len(query), dtype=torch.long)
    sq_base = (base ** 2).sum(1)
    for start in range(0, len(query), _CHUNK):
        q = query[start:start + _CHUNK]
        d2 = (q ** 2).sum(1, keepdim=True) - 2 * q @ base.T + sq_base[None]
        if exclude is not None:
            d2[torch.arange(len(q)), exclude[start:start + _CHUNK]] = math.inf
        nearest = d2.argmin(1)
        dist[start:start + _CHUNK] = (q - base[nearest]).norm(dim=1).float().cpu()
        idx[start:start + _CHUNK] = nearest.cpu()
    return dist, idx


CALIBRATION_SAMPLES = 5000
"""Real samples whose distance to their nearest other real sample sets the copy threshold (a seeded
subsample of larger sets, each compared with all reals): the 1st percentile of 5,000 values is still 50
values deep, and the cost stays linear in the real set's size instead of quadratic."""


class NearestReal:
    """The real samples of one feature space, for nearest-neighbour queries and the copy threshold.

    threshold: the `percentile`-th percentile (linear interpolation) of the real samples' distances to
    their nearest *other* real sample, at least `floor`. It is relative to the real set's own spacing, so
    it means the same in any feature space, and a fresh sample from the real distribution is flagged with
    probability ≈ `percentile`/100. `real` is float N×F, N >= 2.
    """

    def __init__(self, real: torch.Tensor, percentile: float = MEMORISATION_PERCENTILE, *, floor: float = 0.0,
                 max_queries: int = CALIBRATION_SAMPLES):
        n = len(real)
        if n < 2:
            raise UserError("a nearest-neighbour threshold needs at least 2 real images")
        self.real, self.percentile = real, percentile
        queries = torch.arange(n)
        if n > max_queries:
            queries = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_queries]
        self.real_nn, _ = nearest_neighbours(real[queries], real, exclude=queries)
        self.threshold = max(float(np.percentile(self.real_nn.double().numpy(), percentile)), floor)

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float M×F -> (distance, index) of each row's nearest real sample."""
        return nearest_neighbours(x, self.real)

    def is_copy(self, distance):
        return is_copy(distance, self.threshold)


@dataclass(frozen=True)
class Memorisation:
    """Nearest real neighbour of every synthetic sample, and which ones count as copies."""

    share: float
    """Share of synthetic samples at or below `threshold` from their nearest real sample."""
    threshold: float
    """The `percentile`-th percentile of the real set's own nearest-neighbour distances (see `NearestReal`)."""
    percentile: float
    nearest: np.ndarray
    """int64 M: index of each synthetic sample's nearest real sample."""
    distance: np.ndarray
    """float32 M: distance to it."""
    flagged: np.ndarray
    """bool M: `is_copy(distance, threshold)`."""


def memorisation(real: np.ndarray, fake: np.ndarray, *,
                 percentile: float = MEMORISATION_PERCENTILE) -> Memorisation:
    """Flag synthetic samples that sit closer to a real sample than real samples sit to each other
    (`NearestReal`, `is_copy`: the rule synth's `--dedup` applies in pixel space)."""
    r, f = _as_tensor(real, "real"), _as_tensor(fake, "synthetic")
    if len(r) < 2:
        raise UserError("memorisation needs at least 2 real images")
    index = NearestReal(r, percentile)
    dist, idx = index.nearest(f)
    flagged = index.is_copy(dist)
    return Memorisation(share=float(flagged.float().mean()), threshold=index.threshold, percentile=percentile,
                        nearest=idx.numpy(), distance=dist.numpy(), flagged=flagged.numpy())


# ----------------------------------------------------------------------------------------------------
# Feature extractors live in augment_gan.features; these names stay importable from here.

from augment_gan.features import (FeatureExtractor, classifier_extractor, discriminator_extractor,  # noqa: E402,F401
                                  inception_extractor, pixel_extractor, random_extractor)


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
