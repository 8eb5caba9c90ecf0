"""Adversarial losses and regularisers: pure functions of tensors (no optimizer, no backward)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss. hinge: E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]; nonsaturating: softplus form."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind == "nonsaturating":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    raise ValueError(f"unknown loss {kind!r}")


def g_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator loss. hinge: -E[D(G(z))]; nonsaturating: E[softplus(-D(G(z)))]."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "nonsaturating":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"unknown loss {kind!r}")


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E[‖∇_x D(x)‖²] on reals; `real_inputs` must require grad."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def mode_seeking_loss(fakes: torch.Tensor, z: torch.Tensor, eps: float = 1e-5,
                      mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean) -> torch.Tensor:
    """Mode seeking (MSGAN, Mao et al. 2019): 1 / (mean over pairs of ‖G(z₁) − G(z₂)‖₁ / ‖z₁ − z₂‖₁).

    Pairs are consecutive rows (0 with 1, 2 with 3, ...), drawn with the same label, so the only way for
    the generator to lower the loss is to make different latents give different images of that class —
    the cure for a conditional G that maps every latent of a class to one image on a small folder.
    `mean` averages the per-pair ratios; under torch.distributed pass a differentiable mean over all ranks'
    pairs, since 1/mean is not linear and averaging per-rank losses would give another gradient.
    """
    if fakes.shape[0] % 2 or z.shape[0] != fakes.shape[0]:
        raise ValueError("mode_seeking_loss needs an even number of rows in fakes and z")
    d_img = (fakes[0::2] - fakes[1::2]).abs().flatten(1).mean(1)
    d_z = (z[0::2] - z[1::2]).abs().flatten(1).mean(1)
    return 1 / (mean(d_img / d_z) + eps)
