"""The per-step objective: what D, G and E minimise, and every random number a step draws.

The training loop (`train.py`) owns the loop — data, optimizers, EMA, checkpoints — and asks this
module for three losses per step: `Objective.d_loss`, `Objective.g_loss` and `Objective.encoder_loss`.
Each auxiliary term (R1, rotation, completion, auxiliary classifier, mode seeking) is a `Task`: a small
pure function of the step's tensors, the `TrainConfig` field that weights it, and the phase (D or G) it
belongs to. Adding a task (say, jigsaw) means adding its function and `Task` entry here, its weight to
`TrainConfig` and its test — not an edit of the loop. A task that needs random numbers draws them in
`draw_step`, the one place where a step's randomness is drawn.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from augment_gan import diffaug, losses, selfsup
from augment_gan.config import TrainConfig
from augment_gan.errors import UserError
from augment_gan.models import Discriminator, Encoder, Generator


# ----------------------------------------------------------------------------------------------------
# Random draws.

@dataclass
class StepDraws:
    """Every random number one training step uses, already cut to this rank's slice of the global batch."""

    idx: torch.Tensor                 # b: indices of the real images
    z: torch.Tensor                   # b×z_dim: latents of the fakes D sees
    y_fake: torch.Tensor | None       # b: their labels (None when unconditional)
    aug_real: diffaug.Params          # DiffAugment parameters of D's reals,
    aug_fake: diffaug.Params          # of D's fakes,
    rot_k: torch.Tensor               # s: rotations (0-3) of D's self-supervised subset of reals
    masks: torch.Tensor               # s×1×R×R: completion holes (True inside) for that subset
    z_g: torch.Tensor                 # b×z_dim: latents of G's step
    y_g: torch.Tensor | None          # b: their labels (rows 2i, 2i+1 share one when paired for mode seeking)
    aug_g: diffaug.Params             # DiffAugment parameters of G's fakes
    rot_k_g: torch.Tensor             # s: rotations of G's self-supervised subset of fakes
    eps: torch.Tensor                 # s×z_dim: the encoder's reparameterisation noise

    def to(self, device: torch.device) -> "StepDraws":
        """Move what the networks consume to `device` (augmentation parameters, rotations and masks stay
        on the CPU: diffaug and selfsup move them where the images are)."""
        move = (lambda t: None if t is None else t.to(device))
        return dataclasses.replace(self, z=move(self.z), y_fake=move(self.y_fake), z_g=move(self.z_g),
                                   y_g=move(self.y_g), eps=move(self.eps))


@dataclass(frozen=True)
class BatchLayout:
    """Which rows of the global batch this rank computes, and which of those the self-supervised passes see."""

    batch: int                 # B, the global batch
    local: slice               # this rank's rows of it
    sub: torch.Tensor          # indices into the local rows: the self-supervised subset (every stride-th global row)

    @classmethod
    def build(cls, batch: int, rank: int, world: int, selfsup_fraction: float) -> "BatchLayout":
        b = batch // world
        stride = max(1, round(1 / selfsup_fraction))
        if world > 1 and b % stride:
            raise UserError(f"per-rank batch {b} must be a multiple of {stride} (1/selfsup_fraction)")
        sub = torch.tensor([j for j in range(b) if (rank * b + j) % stride == 0])
        return cls(batch, slice(rank * b, (rank + 1) * b), sub)


def sampling_weights(labels: torch.Tensor | None, power: float) -> torch.Tensor | None:
    """Per-image draw weights so that class c is drawn with probability ∝ n_c ** power (`class_sampling`), or
    None when every image is equally likely anyway (unconditional runs, power 1, or classes of equal size)."""
    if labels is None or power == 1.0:
        return None
    counts = torch.bincount(labels)
    present = counts[counts > 0]
    if bool((present == present[0]).all()):
        return None
    return counts.double().pow(power - 1.0)[labels]


def draw_step(gen: torch.Generator, layout: BatchLayout, config: TrainConfig, p: float, n_images: int,
              labels: torch.Tensor | None, *, paired: bool, weights: torch.Tensor | None = None) -> StepDraws:
    """Draw every random number of one step from `gen`, for the global batch, and keep this rank's slice.

    The order of the draws below is part of the checkpoint format: `gen`'s state is saved with each
    checkpoint, so a resumed run continues the same stream, and every rank draws the same global numbers
    and keeps its own rows, so N ranks compute what one process computes. Reordering, adding or
    skipping a draw changes every later step of every run; append new draws at the end, and draw them
    even when their task is off (as the label draws below are drawn for unconditional runs too), so that
    turning a task on or off changes nothing else. `tests/test_objective.py` pins this order.

    `weights` (from `sampling_weights`) replaces the uniform image draws, of reals and of fake labels alike, so
    that D sees each class as often among fakes as among reals.
    """
    B, local, sub = layout.batch, layout.local, layout.sub
    ops = tuple(config.diffaug)

    def images_drawn() -> torch.Tensor:
        if weights is None:
            return torch.randint(n_images, (B,), generator=gen)
        return torch.multinomial(weights, B, replacement=True, generator=gen)

    def fake_labels(pair: bool) -> torch.Tensor | None:
        # Fake labels follow the class frequencies the reals are drawn with: the label of a drawn training image.
        label_idx = images_drawn()
        if pair:
            label_idx[1::2] = label_idx[0::2]
        return labels[label_idx[local]] if labels is not None else None

    idx = images_drawn()[local]
    z = torch.randn(B, config.z_dim, generator=gen)[local]
    y_fake = fake_labels(False)
    aug_real = diffaug.slice_params(diffaug.draw(B, p, ops, gen), local.start, local.stop)
    aug_fake = diffaug.slice_params(diffaug.draw(B, p, ops, gen), local.start, local.stop)
    rot_k = torch.randint(4, (B,), generator=gen)[local][sub]
    masks = selfsup.draw_masks(B, config.resolution, gen)[local][sub]
    z_g = torch.randn(B, config.z_dim, generator=gen)[local]
    y_g = fake_labels(paired)
    aug_g = diffaug.slice_params(diffaug.draw(B, p, ops, gen), local.start, local.stop)
    rot_k_g = torch.randint(4, (B,), generator=gen)[local][sub]
    eps = torch.randn(B, config.z_dim, generator=gen)[local][sub]
    return StepDraws(idx, z, y_fake, aug_real, aug_fake, rot_k, masks, z_g, y_g, aug_g, rot_k_g, eps)


# ----------------------------------------------------------------------------------------------------
# Auxiliary tasks.

@dataclass
class TaskInputs:
    """What a task may read. D-phase tasks see the real side, G-phase tasks the fake side."""

    D: Discriminator
    draws: StepDraws
    sub: torch.Tensor                       # the self-supervised subset of the local rows
    mean: Callable[[torch.Tensor], torch.Tensor]  # a mean over every rank's elements (differentiable)
    x: torch.Tensor | None = None           # D phase: the real images, un-augmented (b×C×R×R, [-1, 1])
    y: torch.Tensor | None = None           #          their labels
    real_in: torch.Tensor | None = None     #          the augmented reals D scored (requires grad for R1)
    f_real: torch.Tensor | None = None      #          D's features of real_in
    d_real: torch.Tensor | None = None      #          D's adversarial logits of real_in
    fake: torch.Tensor | None = None        # G phase: G's fakes, un-augmented
    f_fake: torch.Tensor | None = None      #          D's features of the augmented fakes
    y_g: torch.Tensor | None = None         #          the labels they were asked for
    z_g: torch.Tensor | None = None         #          their latents


@dataclass(frozen=True)
class Task:
    """One auxiliary term: loss = weight(config) × fn(inputs), added to `phase`'s loss when the weight is > 0."""

    name: str                                   # its key in log.jsonl
    phase: str                                  # "D" or "G"
    weight: Callable[[TrainConfig], float]
    fn: Callable[[TaskInputs], torch.Tensor]
    needs_classes: bool = False                 # only for conditional runs


def _class_d(t: TaskInputs) -> torch.Tensor:
    return F.cross_entropy(t.D.classify(t.f_real).float(), t.y)


def _r1(t: TaskInputs) -> torch.Tensor:
    return losses.r1_penalty(t.d_real, t.real_in)


def _rotation_d(t: TaskInputs) -> torch.Tensor:
    k = t.draws.rot_k
    return selfsup.rotation_loss(t.D.rotation_logits(selfsup.rotate(t.x[t.sub], k)), k)


def _completion(t: TaskInputs) -> torch.Tensor:
    x, masks = t.x[t.sub], t.draws.masks
    return selfsup.completion_loss(t.D.complete(selfsup.mask_images(x, masks)), x, masks)


def _class_g(t: TaskInputs) -> torch.Tensor:
    return F.cross_entropy(t.D.classify(t.f_fake).float(), t.y_g)


def _rotation_g(t: TaskInputs) -> torch.Tensor:
    k = t.draws.rot_k_g
    return selfsup.rotation_loss(t.D.rotation_logits(selfsup.rotate(t.fake[t.sub], k)), k)


def _mode_seeking(t: TaskInputs) -> torch.Tensor:
    return losses.mode_seeking_loss(t.fake.float(), t.z_g, mean=t.mean)


# The order within a phase is the order of summation (it matters at the last bit, so keep it).
TASKS: tuple[Task, ...] = (
    Task("loss_class_d", "D", lambda c: c.class_d_weight, _class_d, needs_classes=True),
    Task("loss_r1", "D", lambda c: 0.5 * c.r1_gamma, _r1),
    Task("loss_rot_d", "D", lambda c: c.rotation_d_weight, _rotation_d),
    Task("loss_completion", "D", lambda c: c.completion_weight, _completion),
    Task("loss_class_g", "G", lambda c: c.class_g_weight, _class_g, needs_classes=True),
    Task("loss_rot_g", "G", lambda c: c.rotation_g_weight, _rotation_g),
    Task("loss_ms", "G", lambda c: c.mode_seeking_weight, _mode_seeking),
)


def active_tasks(config: TrainConfig, conditional: bool, phase: str) -> list[Task]:
    """The tasks of `phase` that this run computes (weight > 0, and classes when they need them)."""
    return [t for t in TASKS if t.phase == phase and t.weight(config) > 0 and (conditional or not t.needs_classes)]


# ----------------------------------------------------------------------------------------------------
# The three losses of a step.

def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA only: CPU runs stay fp32 (bf16 matmuls are slow on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Objective:
    """The losses of one training step, given the networks and the step's draws. Holds no training state.

    Each method returns (loss, logs): the scalar to backpropagate and the detached terms to log.
    """

    def __init__(self, config: TrainConfig, G: Generator, D: Discriminator, G_ema: Generator, E: Encoder, *,
                 device: torch.device, layout: BatchLayout, conditional: bool,
                 mean: Callable[[torch.Tensor], torch.Tensor] = torch.mean) -> None:
        self.config, self.G, self.D, self.G_ema, self.E = config, G, D, G_ema, E
        self.device, self.sub, self.conditional, self.mean = device, layout.sub, conditional, mean
        self.d_tasks = active_tasks(config, conditional, "D")
        self.g_tasks = active_tasks(config, conditional, "G")
        self.needs_r1_grad = config.r1_gamma > 0

    def _add(self, loss: torch.Tensor, tasks: list[Task], inputs: TaskInputs,
             logs: dict[str, torch.Tensor]) -> torch.Tensor:
        for task in tasks:
            value = task.fn(inputs)
            logs[task.name] = value.detach()
            loss = loss + task.weight(self.config) * value
        return loss

    def d_loss(self, x: torch.Tensor, y: torch.Tensor | None, draws: StepDraws
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss on augmented reals `x` and fakes of `draws.z`: adversarial + its tasks.

        Returns (loss, D's logits on the reals — the adaptive p reads them, logs).
        """
        D, y_fake = self.D, draws.y_fake
        with torch.no_grad(), autocast(self.device):
            fake = self.G(draws.z, y_fake)
        with autocast(self.device):
            real_in = diffaug.apply(x, draws.aug_real)
            if self.needs_r1_grad:
                real_in = real_in.detach().requires_grad_(True)
            f_real = D.features(real_in)
            d_real = D.adv_from_features(f_real, y).float()
            d_fake = D(diffaug.apply(fake, draws.aug_fake), y_fake).float()
            loss = losses.d_loss(d_real, d_fake, self.config.loss)
            logs = {"loss_d": loss.detach()}
            inputs = TaskInputs(D, draws, self.sub, self.mean, x=x, y=y, real_in=real_in, f_real=f_real,
                                d_real=d_real)
            loss = self._add(loss, self.d_tasks, inputs, logs)
        return loss, d_real, logs

    def g_loss(self, draws: StepDraws) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G's loss: fool D on augmented fakes, plus its tasks."""
        z_g, y_g = draws.z_g, draws.y_g
        with autocast(self.device):
            fake = self.G(z_g, y_g)
            f_fake = self.D.features(diffaug.apply(fake, draws.aug_g))
            loss = losses.g_loss(self.D.adv_from_features(f_fake, y_g).float(), self.config.loss)
            logs = {"loss_g": loss.detach()}
            inputs = TaskInputs(self.D, draws, self.sub, self.mean, fake=fake, f_fake=f_fake, y_g=y_g, z_g=z_g)
            loss = self._add(loss, self.g_tasks, inputs, logs)
        return loss, logs

    def encoder_loss(self, x: torch.Tensor, y: torch.Tensor | None, draws: StepDraws
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """E's loss (weighted): invert the EMA generator on the self-supervised subset; never reaches G or D."""
        sub, G_ema, E = self.sub, self.G_ema, self.E
        z_g, y_g, eps = draws.z_g, draws.y_g, draws.eps
        with autocast(self.device):
            xs = x[sub]
            mu, logvar = E(xs)
            rec = G_ema(mu + (0.5 * logvar).exp() * eps, y[sub] if self.conditional else None)
            z_true = z_g[sub].detach()
            with torch.no_grad():
                fake_e = G_ema(z_true, y_g[sub] if self.conditional else None)
            mu_fake, _ = E(fake_e)
            loss = selfsup.encoder_loss(rec.float(), xs, mu.float(), logvar.float(), mu_fake.float(), z_true,
                                        self.config.encoder_kl_weight)
        return self.config.encoder_weight * loss, {"loss_encoder": loss.detach()}
