"""Differentiable augmentation of everything D sees (DiffAugment, Zhao et al. 2020), applied per sample
with an adaptive probability p (ADA, Karras et al. 2020).

Random parameters are drawn separately from their application (`draw` then `apply`), so a training step
can draw them for the global batch and slice out one rank's part: N ranks then augment exactly as one
process would. Inputs and outputs are float N×C×H×W in [-1, 1].
"""
from __future__ import annotations

import torch

Params = dict[str, torch.Tensor]


def draw(n: int, p: float, ops: tuple[str, ...], generator: torch.Generator) -> Params:
    """Draw augmentation parameters for n images. Each op is applied to each image with probability p.

    Every op always consumes the same amount of randomness, so the stream does not depend on p.
    """
    g = generator
    params: Params = {}
    if "color" in ops:
        params["color_on"] = torch.rand(n, generator=g) < p
        params["brightness"] = torch.rand(n, generator=g) - 0.5          # add in [-0.5, 0.5)
        params["saturation"] = torch.rand(n, generator=g) * 2            # scale in [0, 2)
        params["contrast"] = torch.rand(n, generator=g) + 0.5            # scale in [0.5, 1.5)
    if "translation" in ops:
        params["translation_on"] = torch.rand(n, generator=g) < p
        params["shift"] = torch.rand(n, 2, generator=g) * 2 - 1         # fraction of 1/8 of the size
    if "cutout" in ops:
        params["cutout_on"] = torch.rand(n, generator=g) < p
        params["cutout_center"] = torch.rand(n, 2, generator=g)          # relative position
    return params


def slice_params(params: Params, start: int, stop: int) -> Params:
    return {k: v[start:stop] for k, v in params.items()}


def apply(x: torch.Tensor, params: Params) -> torch.Tensor:
    """Augment x (N×C×H×W) with parameters from `draw`; differentiable with respect to x."""
    if "color_on" in params:
        x = _color(x, params)
    if "translation_on" in params:
        x = _translation(x, params)
    if "cutout_on" in params:
        x = _cutout(x, params)
    return x


def _mask(on: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return on.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _color(x: torch.Tensor, params: Params) -> torch.Tensor:
    on = _mask(params["color_on"], x)
    dev, dt = x.device, x.dtype
    out = x + params["brightness"].to(dev, dt).view(-1, 1, 1, 1)
    if x.shape[1] > 1:  # saturation is meaningless for grayscale
        mean = out.mean(dim=1, keepdim=True)
        out = (out - mean) * params["saturation"].to(dev, dt).view(-1, 1, 1, 1) + mean
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * params["contrast"].to(dev, dt).view(-1, 1, 1, 1) + mean
    return on * out + (1 - on) * x


def _translation(x: torch.Tensor, params: Params, ratio: float = 0.125) -> torch.Tensor:
    """Shift by up to ratio×size pixels with zero padding, via an integer-exact gather."""
    n, _, h, w = x.shape
    on = params["translation_on"].to(x.device)
    shift = (params["shift"].to(x.device) * torch.tensor([h * ratio, w * ratio], device=x.device)).round().long()
    shift = shift * on.long().view(-1, 1)
    rows = torch.arange(h, device=x.device).view(1, h) - shift[:, :1]   # N×H source rows
    cols = torch.arange(w, device=x.device).view(1, w) - shift[:, 1:]   # N×W source cols
    valid = ((rows >= 0) & (rows < h)).view(n, 1, h, 1) & ((cols >= 0) & (cols < w)).view(n, 1, 1, w)
    rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    idx = rows.view(n, 1, h, 1) * w + cols.view(n, 1, 1, w)              # N×1×H×W flat source index
    out = x.flatten(2).gather(2, idx.expand(n, x.shape[1], h, w).flatten(2)).view_as(x)
    return out * valid.to(x.dtype)


def _cutout(x: torch.Tensor, params: Params, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of side ratio×size at a random place (the value 0 is mid-grey in [-1, 1])."""
    n, _, h, w = x.shape
    on = params["cutout_on"].to(x.device)
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    center = params["cutout_center"].to(x.device)
    cy = (center[:, 0] * (h + (1 - ch % 2))).long() - ch // 2
    cx = (center[:, 1] * (w + (1 - cw % 2))).long() - cw // 2
    ys = torch.arange(h, device=x.device).view(1, h)
    xs = torch.arange(w, device=x.device).view(1, w)
    in_y = (ys >= cy.view(-1, 1)) & (ys < (cy + ch).view(-1, 1))
    in_x = (xs >= cx.view(-1, 1)) & (xs < (cx + cw).view(-1, 1))
    cut = (in_y.view(n, 1, h, 1) & in_x.view(n, 1, 1, w)) & on.view(n, 1, 1, 1)
    return x * (~cut).to(x.dtype)


class AdaptiveP:
    """ADA's controller: raise p when D is overconfident on reals (r_t = E[sign D(x)] > target).

    p moves by at most batch×interval / (ada_kimg×1000) per adjustment, so it can travel 0 -> 1 within
    `ada_kimg` thousand images.
    """

    def __init__(self, target: float, ada_kimg: float, p: float = 0.0, p_max: float = 1.0):
        self.target, self.ada_kimg, self.p, self.p_max = target, ada_kimg, p, p_max
        self.sign_sum, self.count = 0.0, 0.0
        self.rt = 0.0

    def accumulate(self, real_logits: torch.Tensor) -> None:
        # Summed on the logits' device: the host reads it only in `update`, every `ada_interval` steps.
        self.sign_sum = self.sign_sum + torch.sign(real_logits.detach()).sum()
        self.count += real_logits.numel()

    def update(self, images_seen: int, reduce=None) -> None:
        """Adjust p from the accumulated statistic; `reduce` all-reduces (sum, count) across ranks."""
        stats = torch.tensor([float(self.sign_sum), self.count], dtype=torch.float64)
        if reduce is not None:
            reduce(stats)
        if stats[1] > 0:
            self.rt = float(stats[0] / stats[1])
            step = images_seen / (self.ada_kimg * 1000)
            self.p = float(min(self.p_max, max(0.0, self.p + (1 if self.rt > self.target else -1) * step)))
        self.sign_sum, self.count = 0.0, 0.0

    def state(self) -> dict:
        return {"p": self.p, "sign_sum": float(self.sign_sum), "count": self.count, "rt": self.rt}

    def load_state(self, state: dict) -> None:
        self.p, self.sign_sum, self.count, self.rt = state["p"], state["sign_sum"], state["count"], state["rt"]
