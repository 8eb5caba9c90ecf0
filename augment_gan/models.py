"""Networks: generator G, discriminator D (with self-supervised heads) and latent encoder E.

The family is DCGAN-shaped (strided 4×4 convolutions) because it is the cheapest architecture that trains
stably on a CPU in minutes; on top of it D uses spectral normalisation (Miyato et al. 2018), a projection
head for classes (Miyato & Koyama 2018), a rotation head (SSGAN, Chen et al. 2019) and a completion decoder
(FastGAN-style self-supervised D, Liu et al. 2021); G uses skip-layer excitation from 128px up (FastGAN).
`benchmarks/bench_fit.py` is where these choices are measured.

All networks take and return float N×C×H×W in [-1, 1]. Nothing here checks for CUDA.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from augment_gan.config import TrainConfig


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose batch statistics cover the global batch when running under torch.distributed.

    torch's SyncBatchNorm only runs on GPUs; this works on any backend (gloo included), so that N ranks
    with batch B/N compute what one process computes with batch B. Set `sync = False` for computations
    only one rank runs (standing statistics at checkpoint time).
    """

    sync = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.sync and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable all-reduce

        n_local = x.shape[0] * x.shape[2] * x.shape[3]
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)),
                           x.new_full((1,), float(n_local))])
        stats = all_reduce(stats)
        c = x.shape[1]
        count = stats[2 * c]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1), alpha=m)
            self.num_batches_tracked.add_(1)
        x_hat = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return x_hat * self.weight[None, :, None, None] + self.bias[None, :, None, None]


@torch.no_grad()
def standing_statistics(g: "Generator", z: torch.Tensor, y: torch.Tensor | None, batch_size: int) -> None:
    """Recompute G's BatchNorm running statistics for its own current weights (BigGAN's "standing stats").

    The EMA generator's averaged weights never ran in train mode, so statistics copied from G do not
    match them; sampling in eval mode with mismatched statistics shrinks the variety between samples.
    Runs the batches of `z` (and labels `y`) through G in train mode with a cumulative average; only this
    process computes (no cross-rank reduction), so rank 0 can call it alone.
    """
    norms = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, getattr(m, "sync", None)) for m in norms]
    was_training = g.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.sync = False
    g.train()
    for start in range(0, z.shape[0], batch_size):
        g(z[start:start + batch_size], None if y is None else y[start:start + batch_size])
    for m, (momentum, sync) in zip(norms, saved):
        m.momentum = momentum
        m.sync = sync
    g.train(was_training)


def _widths(start: int, steps: int, factor: float, lo: int, hi: int) -> list[int]:
    return [int(min(hi, max(lo, start * factor ** i))) for i in range(steps)]


class SkipLayerExcitation(nn.Module):
    """FastGAN's SLE: a low-resolution feature map gates the channels of a high-resolution one."""

    def __init__(self, c_low: int, c_high: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Conv2d(c_low, c_high, 4, bias=False), nn.LeakyReLU(0.1),
            nn.Conv2d(c_high, c_high, 1, bias=False), nn.Sigmoid())

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return high * self.net(low)


class Generator(nn.Module):
    """z (N×z_dim) [+ class] -> image N×C×R×R in [-1, 1] via strided transposed convolutions."""

    def __init__(self, resolution: int, channels: int, z_dim: int, num_classes: int = 0,
                 base_channels: int = 256, min_channels: int = 32):
        super().__init__()
        self.resolution, self.channels, self.z_dim, self.num_classes = resolution, channels, z_dim, num_classes
        n_up = int(math.log2(resolution)) - 2  # 4×4 -> R×R
        widths = _widths(base_channels, n_up, 0.5, min_channels, base_channels)  # width at 4, 8, ..., R/2
        embed_dim = 32 if num_classes else 0
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        self.stem = nn.Sequential(nn.Linear(z_dim + embed_dim, widths[0] * 16, bias=False))
        self.stem_norm = GlobalBatchNorm2d(widths[0])
        self.blocks = nn.ModuleList()
        for i in range(n_up - 1):
            self.blocks.append(nn.Sequential(
                nn.ConvTranspose2d(widths[i], widths[i + 1], 4, 2, 1, bias=False),
                GlobalBatchNorm2d(widths[i + 1]), nn.ReLU(True)))
        self.to_rgb = nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1)
        # SLE pairs (FastGAN): 4×4 gates 64×64, 8×8 gates 128×128; the high side is the input of to_rgb
        # at the matching resolution. Feature maps are indexed by log2(resolution).
        self.sle = nn.ModuleDict()
        for low_res in (4, 8):
            high_res = low_res * 16
            if high_res <= resolution // 2:
                lo_i, hi_i = int(math.log2(low_res)) - 2, int(math.log2(high_res)) - 2
                self.sle[str(high_res)] = SkipLayerExcitation(widths[lo_i], widths[hi_i])

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError("this generator is class-conditional: pass labels y")
            z = torch.cat([z, self.embed(y)], dim=1)
        h = self.stem(z).view(z.shape[0], -1, 4, 4)
        h = F.relu(self.stem_norm(h))
        feats = {4: h}
        for block in self.blocks:
            h = block(h)
            res = h.shape[-1]
            if str(res) in self.sle:
                h = self.sle[str(res)](feats[res // 16], h)
            feats[res] = h
        return torch.tanh(self.to_rgb(h))


class Discriminator(nn.Module):
    """Image (+ class) -> realness logit, plus self-supervised heads sharing the same trunk.

    Heads: `adv` (with class projection), `rotation` (4-way: 0/90/180/270°), `completion` (decodes the
    image at up to 16×16 from the 4×4 trunk features, so D must understand the masked region), and with
    `classifier=True` on a conditional D, `classify` (an AC-GAN-style auxiliary classifier: class logits).

    The trunk is DCGAN's (strided 4×4 convolutions, BatchNorm after all but the first, LeakyReLU 0.2)
    with spectral normalisation on top. Measured on examples/digits (150 steps, batch 16, samples'
    per-pixel std across z in G's output, higher = less collapsed): SN alone 0.05, SN + DCGAN init 0.10,
    SN + init + BatchNorm 0.27; a hidden 256-unit layer before the logit made no difference, so the logit
    reads the flattened 4×4 features directly. BatchNorm is `GlobalBatchNorm2d`, so ranks stay exact.
    """

    def __init__(self, resolution: int, channels: int, num_classes: int = 0,
                 base_channels: int = 32, max_channels: int = 256, classifier: bool = False):
        super().__init__()
        self.resolution, self.channels, self.num_classes = resolution, channels, num_classes
        n_down = int(math.log2(resolution)) - 2  # R×R -> 4×4
        widths = _widths(base_channels, n_down, 2.0, 1, max_channels)
        layers: list[nn.Module] = []
        c_in = channels
        for i, c_out in enumerate(widths):
            layers.append(spectral_norm(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=i == 0)))
            if i > 0:
                layers.append(GlobalBatchNorm2d(c_out))
            layers.append(nn.LeakyReLU(0.2, True))
            c_in = c_out
        self.trunk = nn.Sequential(*layers)
        self.trunk_channels = c_in
        self.feature_dim = c_in * 16
        self.to_features = nn.Flatten()
        self.adv = spectral_norm(nn.Linear(self.feature_dim, 1))
        self.project = spectral_norm(nn.Embedding(num_classes, self.feature_dim)) if num_classes else None
        self.rotation = nn.Linear(self.feature_dim, 4)
        # Only built when asked for, so checkpoints of runs without it keep loading strictly.
        self.classify = nn.Linear(self.feature_dim, num_classes) if classifier and num_classes else None
        # A deliberately small decoder (nearest upsampling + 3×3 convs, 64 -> 16 channels) predicting the
        # image at up to 16×16: at full width and resolution it cost more than D itself on a CPU, and D's
        # features only need to know what belongs in the hole, not its fine texture.
        self.completion_resolution = min(resolution, 16)
        dec: list[nn.Module] = [nn.Conv2d(c_in, 64, 1), nn.LeakyReLU(0.2, True)]
        c, res = 64, 4
        while res < self.completion_resolution:
            c_next = max(16, c // 2)
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c_next, 3, 1, 1), nn.LeakyReLU(0.2, True)]
            c, res = c_next, res * 2
        dec += [nn.Conv2d(c, channels, 3, 1, 1), nn.Tanh()]
        self.completion = nn.Sequential(*dec)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened 4×4 trunk features N×`feature_dim` (used by the heads, linear probes and dedup)."""
        return self.to_features(self.trunk(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.adv_from_features(self.features(x), y)

    def adv_from_features(self, f: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        out = self.adv(f).squeeze(1)
        if self.project is not None:
            if y is None:
                raise ValueError("this discriminator is class-conditional: pass labels y")
            out = out + (self.project(y) * f).sum(dim=1)
        return out

    def rotation_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Rotation head: N×4 logits for 0/90/180/270° (SSGAN)."""
        return self.rotation(self.features(x))

    def complete(self, x: torch.Tensor) -> torch.Tensor:
        """Completion head: the image reconstructed from D's trunk, N×C×r×r with r = min(R, 16)."""
        return self.completion(self.trunk(x))


class Encoder(nn.Module):
    """VAE-style encoder: image -> (mu, logvar) in G's latent space (used for variations of real images)."""

    def __init__(self, resolution: int, channels: int, z_dim: int, base_channels: int = 32,
                 max_channels: int = 256):
        super().__init__()
        n_down = int(math.log2(resolution)) - 2
        widths = _widths(base_channels, n_down, 2.0, 1, max_channels)
        layers: list[nn.Module] = []
        c_in = channels
        for c_out in widths:
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            c_in = c_out
        self.net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * 16, 2 * z_dim))
        self.z_dim = z_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 4)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation (Radford et al. 2016): weights N(0, 0.02), BatchNorm scales N(1, 0.02).

    Measured against torch's default init on examples/digits: twice the sample variety after 150 steps.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):  # embeddings keep N(0, 1), like z
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_networks(config: TrainConfig, channels: int, num_classes: int
                   ) -> tuple[Generator, Discriminator, Encoder]:
    """Construct G, D, E for a config; the only place that maps config fields to architecture."""
    g = Generator(config.resolution, channels, config.z_dim, num_classes,
                  base_channels=config.g_channels, min_channels=config.min_channels)
    d = Discriminator(config.resolution, channels, num_classes,
                      base_channels=config.d_channels, max_channels=config.max_channels,
                      classifier=config.class_d_weight > 0)  # class_g_weight requires it (TrainConfig)
    e = Encoder(config.resolution, channels, config.z_dim, max_channels=config.max_channels)
    dcgan_init(g)
    dcgan_init(d)
    return g, d, e
