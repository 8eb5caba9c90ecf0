"""The training loop: one function, `fit`, that reads top to bottom.

Determinism: every random number a step uses comes from one `torch.Generator` whose state is saved in
each checkpoint, and is drawn for the *global* batch; a rank keeps its slice. So a run resumed from a
checkpoint, and a run split across N ranks (torchrun), compute what a single uninterrupted process
computes (bitwise for resume on CPU; up to float summation order for N ranks).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from augment_gan import __version__, diffaug, losses, selfsup
from augment_gan.atomic import write_bytes_atomic
from augment_gan.checkpoint import config_from_meta, list_checkpoints, load_training_state, save_checkpoint
from augment_gan.config import TrainConfig
from augment_gan.data import ReadOptions, load_folder
from augment_gan.device import resolve_device
from augment_gan.errors import UserError
from augment_gan.grid import save_grid
from augment_gan.models import build_networks, standing_statistics
from augment_gan.pixels import hwc_to_nchw, to_float

# Config fields a resumed run may change: they set how long and how often, not what is computed.
RESUME_OVERRIDABLE = ("kimg", "minutes", "checkpoint_minutes", "log_every", "num_workers")


class TrainingDiverged(UserError):
    """A loss became NaN or inf; the run stops and keeps its last good checkpoint."""


class Interrupted(UserError):
    """SIGINT/SIGTERM arrived; a checkpoint was written at the last step boundary."""


# ----------------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in a single process).

def _dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _all_reduce_mean_grads(modules: list[torch.nn.Module], world: int) -> None:
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


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on RUN/.lock for the lifetime of a fit; a second fit on the same run fails fast."""
    import fcntl  # POSIX only; imported here so the library imports everywhere

    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir} is in use by another running `augment-gan fit` (lock: {run_dir / '.lock'})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked at step boundaries, so a checkpoint is never half a step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _autocast(device: torch.device):
    # bf16 autocast on CUDA only: CPU runs stay fp32 (bf16 matmuls are slow on most CPUs).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _ema_beta(config: TrainConfig, batch: int, nimg: int) -> float:
    half_life = config.ema_kimg * 1000
    if config.ema_rampup > 0:
        half_life = min(half_life, nimg * config.ema_rampup)
    return 0.5 ** (batch / max(half_life, 1e-8))


# ----------------------------------------------------------------------------------------------------

def fit(folder: str | Path, config: TrainConfig, out_dir: str | Path, *, resume: bool = False,
        device: str = "auto", cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Train G, D and E on the images in `folder`; write checkpoints, grids and logs to `out_dir`.

    Returns the path of the final checkpoint. With `resume=True`, continues the latest checkpoint in
    `out_dir` (step, kimg, adaptive p, optimizer, RNG and EMA state); only the fields in
    `RESUME_OVERRIDABLE` may differ from the saved config.
    """
    out_dir = Path(out_dir)
    rank, world, local_rank = _dist_env()
    is_main = rank == 0

    # Distributed setup.
    dev = resolve_device(device)
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if config.batch_size % world:
        raise UserError(f"batch size {config.batch_size} must be divisible by the number of ranks ({world})")

    lock = _run_lock(out_dir) if is_main else contextlib.nullcontext()
    with lock, _StopFlag() as stop:
        return _fit_locked(folder, config, out_dir, resume, dev, cache_dir, progress, rank, world, stop)


def _fit_locked(folder, config, out_dir, resume, dev, cache_dir, progress, rank, world, stop) -> Path:
    is_main = rank == 0
    existing = list_checkpoints(out_dir)

    # Resume or start fresh.
    saved = None
    if resume:
        if not existing:
            raise UserError(f"--resume: {out_dir} has no checkpoint to resume from")
        nets_sd, optim_sd, rng_sd, meta = load_training_state(existing[-1])
        saved_config = config_from_meta(meta)
        diffs = [f.name for f in fields(TrainConfig)
                 if f.name not in RESUME_OVERRIDABLE and getattr(saved_config, f.name) != getattr(config, f.name)]
        if diffs:
            raise UserError(f"--resume: {', '.join(diffs)} differ from the run's saved config; only "
                            f"{', '.join(RESUME_OVERRIDABLE)} may change")
        saved = (nets_sd, optim_sd, rng_sd, meta)
    elif existing or (out_dir / "log.jsonl").exists():
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")

    # Load training set (rank 0 decodes and fills the cache first; the others then memory-map it).
    options = ReadOptions(resolution=config.resolution, fit=config.fit, background=tuple(config.background))
    cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    if is_main:
        images = load_folder(folder, options, cache_dir=cache, progress=progress)
    if world > 1:
        dist.barrier()
    if not is_main:
        images = load_folder(folder, options, cache_dir=cache, progress=False)
    data = hwc_to_nchw(images.images)                         # uint8 N×C×R×R, in memory
    n_images, channels = data.shape[0], data.shape[1]
    conditional = bool(config.conditional and images.labels is not None and len(images.classes) > 1)
    labels = torch.from_numpy(np.asarray(images.labels, dtype=np.int64)) if conditional else None
    classes = list(images.classes) if conditional else []
    data_info = {"root": str(Path(folder).resolve()), "images": n_images, "channels": channels,
                 "classes": list(images.classes), "skipped": len(images.skipped)}
    if saved is not None:
        old = saved[3]
        if old.get("classes", []) != classes or old["channels"] != channels:
            raise UserError(f"--resume: the folder's classes/channels differ from the run's "
                            f"({old.get('classes')}, {old['channels']} channels)")
        if old.get("data", {}).get("images") != n_images:
            print(f"warning: the folder now has {n_images} images (the run started with "
                  f"{old.get('data', {}).get('images')}); resuming is no longer exact", file=sys.stderr)

    # Construct networks.
    torch.manual_seed(config.seed)
    G, D, E = build_networks(config, channels, len(classes))
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    nets = {"G": G, "G_ema": G_ema, "D": D, "E": E}
    for net in nets.values():
        net.to(dev)
        if dev.type == "cuda":
            net.to(memory_format=torch.channels_last)
    opt_g = torch.optim.Adam(G.parameters(), lr=config.g_lr, betas=config.betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=config.d_lr, betas=config.betas)
    opt_e = torch.optim.Adam(E.parameters(), lr=config.g_lr, betas=(0.5, 0.99))
    optims = {"G": opt_g, "D": opt_d, "E": opt_e}
    gen = torch.Generator().manual_seed(config.seed)   # every random draw of the loop
    ada = diffaug.AdaptiveP(config.ada_target, config.ada_kimg, config.ada_p_init, config.ada_p_max)
    step, nimg, elapsed_before = 0, 0, 0.0
    if saved is not None:
        nets_sd, optim_sd, rng_sd, meta = saved
        for name, net in nets.items():
            net.load_state_dict(nets_sd[name])
        for name, opt in optims.items():
            opt.load_state_dict(optim_sd[name])
        gen.set_state(rng_sd["loop"])
        ada.load_state(meta["ada"])
        step, nimg, elapsed_before = meta["step"], meta["nimg"], meta["elapsed_s"]
    grid_gen = torch.Generator().manual_seed(config.seed + 1)
    grid_z = torch.randn(config.grid_size * max(1, min(len(classes), 16) if conditional else config.grid_size),
                         config.z_dim, generator=grid_gen)

    # Per-rank views of the global batch.
    B = config.batch_size
    b = B // world
    local = slice(rank * b, (rank + 1) * b)
    stride = max(1, round(1 / config.selfsup_fraction))
    if world > 1 and b % stride:
        raise UserError(f"per-rank batch {b} must be a multiple of {stride} (1/selfsup_fraction)")
    sub = torch.tensor([j for j in range(b) if (rank * b + j) % stride == 0])  # self-supervised subset
    ops = tuple(config.diffaug)
    use_rot_d, use_rot_g = config.rotation_d_weight > 0, config.rotation_g_weight > 0
    use_completion, use_encoder = config.completion_weight > 0, config.encoder_weight > 0
    use_ms = config.mode_seeking_weight > 0
    use_class_d = conditional and config.class_d_weight > 0
    use_class_g = conditional and config.class_g_weight > 0
    if use_ms and b % 2:
        raise UserError(f"mode_seeking_weight > 0 needs an even per-rank batch, got {b}")

    def draw_labels(paired: bool = False) -> torch.Tensor | None:
        # Fake labels follow the data's class frequencies: the label of a random training image.
        # Paired: rows 2i and 2i+1 share a label (the mode-seeking term compares them).
        idx = torch.randint(n_images, (B,), generator=gen)
        if paired:
            idx[1::2] = idx[0::2]
        return labels[idx[local]].to(dev) if conditional else None

    def global_mean(t: torch.Tensor) -> torch.Tensor:
        """Mean of `t` over every rank's elements, differentiable (each rank has the same count)."""
        if world == 1:
            return t.mean()
        from torch.distributed.nn.functional import all_reduce  # differentiable all-reduce

        return all_reduce(t.mean()) / world

    def to_dev(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dev, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x

    def reduce_sum(t: torch.Tensor) -> None:
        if world > 1:
            dist.all_reduce(t)

    # Bookkeeping: run config, log, checkpoints.
    if is_main:
        (out_dir / "grids").mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out_dir / "config.json", (json.dumps(
            {"package_version": __version__, "config": config.to_dict(), "data": data_info},
            indent=2, sort_keys=True) + "\n").encode())
    log_file = open(out_dir / "log.jsonl", "a") if is_main else None
    tb = _tensorboard(out_dir) if is_main else None

    def checkpoint() -> Path | None:
        if not is_main:
            return None
        meta = {"config": config.to_dict(), "conditional": conditional, "classes": classes,
                "channels": channels, "resolution": config.resolution, "nimg": nimg,
                "kimg": nimg / 1000, "elapsed_s": elapsed_before + (clock() - t_start),
                "ada": ada.state(), "data": data_info}
        # Standing statistics for the EMA generator, from a fixed stream of latents so that the checkpoint is
        # a function of the training state alone (the next step overwrites these buffers again).
        stand = torch.Generator().manual_seed(config.seed + 2)
        n_stand = 8 * B
        stand_z = torch.randn(n_stand, config.z_dim, generator=stand).to(dev)
        stand_y = labels[torch.randint(n_images, (n_stand,), generator=stand)].to(dev) if conditional else None
        with _autocast(dev):
            standing_statistics(G_ema, stand_z, stand_y, B)
        path = save_checkpoint(out_dir, step, nets, optims, {"loop": gen.get_state()}, meta)
        with torch.no_grad():
            y = (torch.arange(min(len(classes), 16)).repeat_interleave(config.grid_size).to(dev)
                 if conditional else None)
            with _autocast(dev):
                images_out = G_ema(grid_z.to(dev), y)
        save_grid(images_out.float(), config.grid_size, out_dir / "grids" / f"grid-{step:08d}.png")
        return path

    def budget_done() -> bool:
        if config.kimg is not None:
            return nimg >= config.kimg * 1000
        done = elapsed_before + (clock() - t_start) >= config.minutes * 60
        if world > 1:  # clocks differ between ranks: rank 0 decides for everyone
            flag = torch.tensor([1.0 if done and is_main else 0.0])
            dist.all_reduce(flag)
            done = flag.item() > 0
        return done

    # Train.
    # The budget clock (`elapsed_s` in checkpoints): wall time, or this process's CPU time.
    clock = time.process_time if config.clock == "cpu" else time.monotonic
    t_start = clock()
    wall_start = time.monotonic()
    last_ckpt_time = wall_start
    last_path: Path | None = existing[-1] if existing else None
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # steps that logged each loss (E's only every encoder_interval steps)
    window_start, window_nimg = time.monotonic(), nimg
    bar = tqdm(total=config.kimg, unit="kimg", disable=not (progress and is_main), file=sys.stderr,
               initial=nimg / 1000, bar_format="{l_bar}{bar}| {n:.2f}/{total} kimg [{elapsed}<{remaining}{postfix}]"
               if config.kimg else "{desc} {n:.2f} kimg [{elapsed}{postfix}]")
    try:
        while not budget_done():
            # -- Draw every random number of this step for the global batch, keep this rank's slice.
            idx = torch.randint(n_images, (B,), generator=gen)[local]
            x = to_dev(to_float(data[idx]))
            y = labels[idx].to(dev) if conditional else None
            z = torch.randn(B, config.z_dim, generator=gen)[local].to(dev)
            y_fake = draw_labels()
            p = config.fixed_p if config.fixed_p is not None else ada.p
            aug_real = diffaug.slice_params(diffaug.draw(B, p, ops, gen), local.start, local.stop)
            aug_fake = diffaug.slice_params(diffaug.draw(B, p, ops, gen), local.start, local.stop)
            rot_k = torch.randint(4, (B,), generator=gen)[local][sub]
            masks = selfsup.draw_masks(B, config.resolution, gen)[local][sub]
            z_g = torch.randn(B, config.z_dim, generator=gen)[local].to(dev)
            y_g = draw_labels(paired=use_ms)
            aug_g = diffaug.slice_params(diffaug.draw(B, p, ops, gen), local.start, local.stop)
            rot_k_g = torch.randint(4, (B,), generator=gen)[local][sub]
            eps = torch.randn(B, config.z_dim, generator=gen)[local][sub].to(dev)
            logs: dict[str, torch.Tensor] = {}

            # -- Discriminator step: adversarial loss on augmented reals and fakes, plus self-supervision and the
            #    auxiliary classifier (reals only).
            D.requires_grad_(True)
            with torch.no_grad(), _autocast(dev):
                fake = G(z, y_fake)
            with _autocast(dev):
                real_in = diffaug.apply(x, aug_real)
                if config.r1_gamma > 0:
                    real_in = real_in.detach().requires_grad_(True)
                f_real = D.features(real_in)
                d_real = D.adv_from_features(f_real, y).float()
                d_fake = D(diffaug.apply(fake, aug_fake), y_fake).float()
                loss_d = losses.d_loss(d_real, d_fake, config.loss)
                logs["loss_d"] = loss_d.detach()
                if use_class_d:
                    logs["loss_class_d"] = F.cross_entropy(D.classify(f_real).float(), y)
                    loss_d = loss_d + config.class_d_weight * logs["loss_class_d"]
                if config.r1_gamma > 0:
                    loss_d = loss_d + 0.5 * config.r1_gamma * losses.r1_penalty(d_real, real_in)
                if use_rot_d:
                    rot_logits = D.rotation_logits(selfsup.rotate(x[sub], rot_k))
                    logs["loss_rot_d"] = selfsup.rotation_loss(rot_logits, rot_k)
                    loss_d = loss_d + config.rotation_d_weight * logs["loss_rot_d"]
                if use_completion:
                    x_hat = D.complete(selfsup.mask_images(x[sub], masks))
                    logs["loss_completion"] = selfsup.completion_loss(x_hat, x[sub], masks)
                    loss_d = loss_d + config.completion_weight * logs["loss_completion"]
            ada.accumulate(d_real)
            _check_finite(loss_d, "D", step, last_path, world)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            _all_reduce_mean_grads([D], world)
            opt_d.step()

            # -- Generator step: fool D on augmented fakes; be rewarded when D can tell their rotation and class.
            D.requires_grad_(False)
            with _autocast(dev):
                fake = G(z_g, y_g)
                f_fake = D.features(diffaug.apply(fake, aug_g))
                loss_g = losses.g_loss(D.adv_from_features(f_fake, y_g).float(), config.loss)
                logs["loss_g"] = loss_g.detach()
                if use_class_g:
                    logs["loss_class_g"] = F.cross_entropy(D.classify(f_fake).float(), y_g)
                    loss_g = loss_g + config.class_g_weight * logs["loss_class_g"]
                if use_rot_g:
                    rot_logits = D.rotation_logits(selfsup.rotate(fake[sub], rot_k_g))
                    logs["loss_rot_g"] = selfsup.rotation_loss(rot_logits, rot_k_g)
                    loss_g = loss_g + config.rotation_g_weight * logs["loss_rot_g"]
                if use_ms:
                    logs["loss_ms"] = losses.mode_seeking_loss(fake.float(), z_g, mean=global_mean)
                    loss_g = loss_g + config.mode_seeking_weight * logs["loss_ms"]
            _check_finite(loss_g, "G", step, last_path, world)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            _all_reduce_mean_grads([G], world)
            opt_g.step()

            # -- EMA generator (sampling uses it): parameters averaged, buffers (BN statistics) copied.
            nimg += B
            with torch.no_grad():
                beta = _ema_beta(config, B, nimg)
                for p_ema, p_cur in zip(G_ema.parameters(), G.parameters()):
                    p_ema.lerp_(p_cur, 1 - beta)
                for b_ema, b_cur in zip(G_ema.buffers(), G.buffers()):
                    b_ema.copy_(b_cur)

            # -- Latent encoder: invert the EMA generator (E's loss never reaches G or D).
            if use_encoder and step % config.encoder_interval == 0:
                with _autocast(dev):
                    xs = x[sub]
                    mu, logvar = E(xs)
                    rec = G_ema(mu + (0.5 * logvar).exp() * eps, y[sub] if conditional else None)
                    z_true = z_g[sub].detach()
                    with torch.no_grad():
                        fake_e = G_ema(z_true, y_g[sub] if conditional else None)
                    mu_fake, _ = E(fake_e)
                    loss_e = selfsup.encoder_loss(rec.float(), xs, mu.float(), logvar.float(),
                                                  mu_fake.float(), z_true, config.encoder_kl_weight)
                logs["loss_encoder"] = loss_e.detach()
                _check_finite(loss_e, "E", step, last_path, world)
                opt_e.zero_grad(set_to_none=True)
                (config.encoder_weight * loss_e).backward()
                _all_reduce_mean_grads([E], world)
                opt_e.step()

            # -- Adaptive augmentation probability.
            step += 1
            if config.fixed_p is None and step % config.ada_interval == 0:
                ada.update(B * config.ada_interval, reduce_sum if world > 1 else None)

            # -- Logging, checkpoints, stop requests.
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
                counts[k] = counts.get(k, 0) + 1
            bar.n = nimg / 1000
            if step % 10 == 0:
                bar.refresh()
            if step % config.log_every == 0:
                now = time.monotonic()
                record = {"step": step, "kimg": round(nimg / 1000, 4),
                          "time_s": round(elapsed_before + clock() - t_start, 3),
                          "img_per_s": round((nimg - window_nimg) / max(now - window_start, 1e-9), 2),
                          "p": round(p, 5), "rt": round(ada.rt, 5),
                          **{k: round(v / counts[k], 6) for k, v in sums.items()}}
                sums, counts, window_start, window_nimg = {}, {}, now, nimg
                if is_main:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                    if tb is not None:
                        for k, v in record.items():
                            if k != "step":
                                tb.add_scalar(k, v, step)
                    bar.set_postfix({"img/s": record["img_per_s"], "D": record.get("loss_d"),
                                     "G": record.get("loss_g"), "p": record["p"]}, refresh=False)
            if is_main and time.monotonic() - last_ckpt_time >= config.checkpoint_minutes * 60:
                last_path = checkpoint()
                last_ckpt_time = time.monotonic()
            if _stop_requested(stop, world):
                last_path = checkpoint() or last_path
                raise Interrupted(f"interrupted at kimg {nimg / 1000:.2f}; saved {last_path}; "
                                  "continue with the same command plus --resume")
        last_path = checkpoint() or last_path
        if world > 1:
            dist.barrier()
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
        if tb is not None:
            tb.close()
    return last_path


def _check_finite(loss: torch.Tensor, name: str, step: int, last: Path | None, world: int) -> None:
    """Stop the run on NaN/inf (all ranks agree); the last good checkpoint on disk is kept as is."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    if world > 1:
        dist.all_reduce(bad)
    if bad.item() > 0:
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(f"{name} loss became NaN/inf at step {step}; stopped without saving; {where} "
                               "(try a lower learning rate or --config with r1_gamma > 0)")


def _stop_requested(stop: _StopFlag, world: int) -> bool:
    if world == 1:
        return stop.signal is not None
    flag = torch.tensor([1.0 if stop.signal is not None else 0.0])
    dist.all_reduce(flag)
    return flag.item() > 0


def _tensorboard(out_dir: Path):
    """A SummaryWriter when tensorboard is installed (optional extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))
