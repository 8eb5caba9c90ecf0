"""The plain DCGAN reference of the fit benchmark, written the way pytorch/examples/dcgan writes it.

BatchNorm in G and D, ReLU/LeakyReLU(0.2), N(0, 0.02) init, Adam lr 2e-4 β1=0.5, non-saturating BCE loss,
ngf = ndf = 64, z = 100. The examples' networks are for 64px; at 32px the outermost layer of each is
dropped (4 → 8 → 16 → 32), which is how DCGAN is usually run on CIFAR-sized images. Trained by its own
loop on the same cached uint8 array as augment-gan, for the same wall-clock budget.

No augmentation, no EMA, no spectral norm, no self-supervision: it is the yardstick, not a contender.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from augment_gan.pixels import to_float, to_uint8

NZ, NGF, NDF = 100, 64, 64
LR, BETA1 = 2e-4, 0.5
BATCH_SIZE = 64  # the examples' default, and TrainConfig's, so both see batches of the same size


class Generator(nn.Module):
    """z (N×100×1×1) -> N×C×32×32 in [-1, 1]."""

    def __init__(self, channels: int, nz: int = NZ, ngf: int = NGF):
        super().__init__()
        self.nz = nz
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),  # 4×4
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),  # 8×8
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),  # 16×16
            nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False), nn.Tanh())  # 32×32

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class Discriminator(nn.Module):
    """N×C×32×32 -> realness logits N (the examples end in Sigmoid + BCELoss; logits + BCE-with-logits is
    the same loss, computed without the log(0) the sigmoid form can hit)."""

    def __init__(self, channels: int, ndf: int = NDF):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True),  # 16×16
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2), nn.LeakyReLU(0.2, True),  # 8×8
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4), nn.LeakyReLU(0.2, True),  # 4×4
            nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False))  # 1×1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1)


def weights_init(m: nn.Module) -> None:
    """The examples' init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and bias 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def train(data: torch.Tensor, *, minutes: float, clock: str = "wall", batch_size: int = BATCH_SIZE, seed: int = 0,
          device: str | torch.device = "cpu",
          progress: Callable[[int, float, float], None] | None = None) -> tuple[Generator, dict]:
    """Train on uint8 N×C×32×32 images until `minutes` of time have passed on `clock` ("wall" or "cpu",
    this process's CPU time, as `TrainConfig.clock`).

    Returns G (in train mode, see `sample`) and {"steps", "kimg", "train_seconds"}. `progress(step, loss_d,
    loss_g)` is called every 50 steps. Batches are shuffled epochs without replacement, as a DataLoader
    with shuffle=True and drop_last=True gives them.
    """
    device = torch.device(device)
    channels = data.shape[1]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G, D = Generator(channels).to(device), Discriminator(channels).to(device)
        G.apply(weights_init)
        D.apply(weights_init)
    opt_d = torch.optim.Adam(D.parameters(), lr=LR, betas=(BETA1, 0.999))
    opt_g = torch.optim.Adam(G.parameters(), lr=LR, betas=(BETA1, 0.999))
    batch_size = min(batch_size, len(data))
    ones = torch.ones(batch_size, device=device)
    zeros = torch.zeros(batch_size, device=device)

    step, order, pos = 0, torch.empty(0, dtype=torch.long), 0
    now = time.process_time if clock == "cpu" else time.monotonic
    t_start = now()
    while now() - t_start < minutes * 60:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        real = to_float(data[order[pos:pos + batch_size]]).to(device)
        pos += batch_size
        noise = torch.randn(batch_size, G.nz, 1, 1, generator=gen).to(device)

        # (1) D: maximise log D(x) + log(1 - D(G(z))); reals and fakes in separate batches (own BN stats).
        opt_d.zero_grad(set_to_none=True)
        err_real = F.binary_cross_entropy_with_logits(D(real), ones)
        err_real.backward()
        fake = G(noise)
        err_fake = F.binary_cross_entropy_with_logits(D(fake.detach()), zeros)
        err_fake.backward()
        opt_d.step()

        # (2) G: maximise log D(G(z)) (the non-saturating loss), reusing the same fakes.
        opt_g.zero_grad(set_to_none=True)
        err_g = F.binary_cross_entropy_with_logits(D(fake), ones)
        err_g.backward()
        opt_g.step()

        step += 1
        if progress is not None and step % 50 == 0:
            progress(step, (err_real + err_fake).item(), err_g.item())
    seconds = now() - t_start
    return G, {"steps": step, "kimg": step * batch_size / 1000, "train_seconds": seconds}


@torch.no_grad()
def sample(G: Generator, n: int, *, seed: int, batch_size: int = BATCH_SIZE,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 N×C×32×32 samples.

    G stays in train mode, so BatchNorm normalises with the statistics of each sample batch of
    `batch_size` — how it ran during training and how the examples draw their sample grids; eval mode
    would use running averages that a short run has not settled.
    """
    gen = torch.Generator().manual_seed(seed)
    G.train()
    out = []
    for _ in range(0, n, batch_size):  # full batches only (the last one trimmed), so every BN batch is alike
        z = torch.randn(batch_size, G.nz, 1, 1, generator=gen).to(device)
        out.append(to_uint8(G(z)).cpu())
    return torch.cat(out)[:n]
