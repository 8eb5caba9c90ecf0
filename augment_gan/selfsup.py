"""Self-supervised constraints: rotation prediction, image completion and the latent encoder's loss.

Each is a small pure function with its own weight in `TrainConfig`; the training loop decides which
images they see.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each image x[i] (N×C×H×W, square) by k[i]×90° counter-clockwise."""
    out = x
    for r in range(1, 4):
        sel = k == r
        if bool(sel.any()):  # k lives on the CPU (the step's draws): no device sync here
            out = torch.where(sel.to(x.device).view(-1, 1, 1, 1), torch.rot90(x, r, dims=(2, 3)), out)
    return out


def rotation_loss(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 4-way rotation classifier (SSGAN): logits N×4, targets k in {0,1,2,3}."""
    return F.cross_entropy(logits.float(), k.to(logits.device))


def draw_masks(n: int, size: int, generator: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Random square holes covering ratio² of each image: bool N×1×size×size, True inside the hole."""
    side = max(1, int(size * ratio))
    corner = (torch.rand(n, 2, generator=generator) * (size - side + 1)).long()
    ys = torch.arange(size).view(1, size)
    in_y = (ys >= corner[:, :1]) & (ys < corner[:, :1] + side)
    in_x = (ys >= corner[:, 1:]) & (ys < corner[:, 1:] + side)
    return (in_y.view(n, 1, size, 1) & in_x.view(n, 1, 1, size))


def mask_images(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """x̄: the image with its hole set to 0 (mid-grey). masks are at x's resolution."""
    return x * (~masks.to(x.device)).to(x.dtype)


def completion_loss(x_hat: torch.Tensor, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """½‖x − x̂‖² over the hole, averaged per hole pixel (x̂ may be at a lower resolution than x)."""
    r = x_hat.shape[-1]
    if x.shape[-1] != r:
        x = F.adaptive_avg_pool2d(x, r)
        masks = F.adaptive_avg_pool2d(masks.float(), r) > 0.5
    m = masks.to(device=x.device, dtype=x_hat.dtype).expand_as(x_hat)
    return 0.5 * ((x_hat.float() - x.float()).square() * m).sum() / m.sum().clamp_min(1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) ‖ N(0, I)), summed over latent dims and averaged over the batch."""
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(dim=1).mean()


def encoder_loss(reconstruction: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                 z_pred: torch.Tensor, z_true: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """VAE-style encoder objective: ½‖G(E(x)) − x‖² + β·KL + ½‖E(G(z)) − z‖².

    The last term (latent regression on generated images) anchors E to G's own latent space, which is what
    makes variations of a real image stay on the generator's manifold.
    """
    pixel = 0.5 * (reconstruction - x).square().flatten(1).sum(1).mean() / x[0].numel()
    latent = 0.5 * (z_pred - z_true).square().mean()
    return pixel + latent + kl_weight * kl_divergence(mu, logvar) / mu.shape[1]
