"""torchrun helpers for the training loop; each is a no-op (or the plain version) in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def all_reduce_mean_grads(modules: list[torch.nn.Module], world: int) -> None:
    """Average gradients across ranks in one flat all-reduce (what DDP does, without its hooks)."""
    if world == 1:
        return
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def global_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over every rank's elements, differentiable (each rank has the same count)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.mean()
    from torch.distributed.nn.functional import all_reduce  # differentiable all-reduce

    return all_reduce(t.mean()) / dist.get_world_size()


def any_rank(flag: bool, world: int) -> bool:
    """True when `flag` is true on any rank (all ranks take part; a host sync under torchrun)."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t)
    return t.item() > 0
