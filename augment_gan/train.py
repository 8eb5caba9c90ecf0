"""The training loop: `fit` and `_fit_locked` read top to bottom; what is minimised lives in `objective.py`.

Determinism: every random number a step uses comes from one `torch.Generator` whose state is saved in
each checkpoint, and is drawn for the *global* batch; a rank keeps its slice. So a run resumed from a
checkpoint, and a run split across N ranks (torchrun), compute what a single uninterrupted process
computes (bitwise for resume on CPU; up to float summation order for N ranks).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from augment_gan import __version__, diffaug
from augment_gan.atomic import write_bytes_atomic
from augment_gan.checkpoint import (
    SUPERSEDED,
    checkpoint_dir,
    checkpoint_step,
    estimated_size,
    list_checkpoints,
    load_training_state,
    remove_unfinished,
    resume_choice,
    save_checkpoint,
    supersede_after,
)
from augment_gan.config import RESUME_OVERRIDABLE, TrainConfig, run_differences
from augment_gan.device import resolve_device
from augment_gan.distributed import all_reduce_mean_grads, any_rank, dist_env, global_mean
from augment_gan.errors import UserError, os_error_message
from augment_gan.grid import save_grid
from augment_gan.guard import StopFlag, run_lock
from augment_gan.models import build_networks, standing_statistics
from augment_gan.monitor import Budget, FiniteWatch, RunLogger, TrainingDiverged  # noqa: F401 (TrainingDiverged: public)
from augment_gan.objective import BatchLayout, Objective, autocast, draw_step, sampling_weights
from augment_gan.outputs import reserve_room
from augment_gan.pixels import to_float
from augment_gan.pseudolabel import PSEUDO_LABELS, LabelerConfig, check_labeled_folder
from augment_gan.runmeta import RunMeta
from augment_gan.trainset import (
    TrainingSet,
    check_same_data,
    check_same_labels,
    images_on,
    load_labeled_training_set,
    load_training_set,
)

_log = logging.getLogger(__name__)


class Interrupted(UserError):
    """SIGINT/SIGTERM arrived; a checkpoint was written at the last step boundary."""


class WriteFailed(UserError):
    """Writing the run's files failed (a full disk, a read-only folder); the last good checkpoint is kept."""


def _ema_beta(config: TrainConfig, batch: int, nimg: int) -> float:
    half_life = config.ema_kimg * 1000
    if config.ema_rampup > 0:
        half_life = min(half_life, nimg * config.ema_rampup)
    return 0.5 ** (batch / max(half_life, 1e-8))


# ----------------------------------------------------------------------------------------------------
# The pieces a run is made of.

def _saved_state(out_dir: Path, config: TrainConfig, resume: bool, checkpoint: str | Path | None):
    """The training state to continue when resuming (None for a fresh run), after the checks: the run's
    newest checkpoint, or `checkpoint`."""
    existing = list_checkpoints(out_dir)
    if not resume:
        # A folder whose fit stopped before its first checkpoint holds nothing worth keeping: start it again.
        if existing:
            raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        return None
    # resume_choice picks without reading; load_training_state reads and checks each file once.
    saved = load_training_state(resume_choice(out_dir, checkpoint), run_dir=out_dir)
    diffs = run_differences(saved[3].config, config)
    if diffs:
        raise UserError(f"--resume: {', '.join(diffs)} differ from the run's saved config; only "
                        f"{', '.join(RESUME_OVERRIDABLE)} may change")
    return saved


def _build(config: TrainConfig, train_set: TrainingSet, dev: torch.device):
    """Networks (G, its EMA copy, D, E) on `dev` and their optimizers, initialised from `config.seed`."""
    torch.manual_seed(config.seed)
    G, D, E = build_networks(config, train_set.info.channels, len(train_set.classes))
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    nets = {"G": G, "G_ema": G_ema, "D": D, "E": E}
    for net in nets.values():
        net.to(dev)
        if dev.type == "cuda":
            net.to(memory_format=torch.channels_last)
    optims = {"G": torch.optim.Adam(G.parameters(), lr=config.g_lr, betas=config.betas),
              "D": torch.optim.Adam(D.parameters(), lr=config.d_lr, betas=config.betas),
              "E": torch.optim.Adam(E.parameters(), lr=config.g_lr, betas=(0.5, 0.99))}
    return nets, optims


@dataclass
class _Run:
    """What stays fixed for a whole run, shared by the loop and its checkpointing."""

    config: TrainConfig
    out_dir: Path
    dev: torch.device
    train_set: TrainingSet
    nets: dict[str, torch.nn.Module]
    optims: dict[str, torch.optim.Optimizer]
    gen: torch.Generator               # every random draw of the loop (objective.draw_step)
    ada: diffaug.AdaptiveP
    grid_z: torch.Tensor               # the latents of every sample grid


def _save(run: _Run, step: int, nimg: int, elapsed_s: float) -> Path:
    """Write a checkpoint of the current state and a sample grid of the EMA generator."""
    config, dev, train_set, G_ema = run.config, run.dev, run.train_set, run.nets["G_ema"]
    meta = RunMeta(config=config, conditional=train_set.conditional, classes=tuple(train_set.classes),
                   channels=train_set.info.channels, step=step, nimg=nimg, elapsed_s=elapsed_s,
                   ada=run.ada.state(), data=train_set.info)
    # Standing statistics for the EMA generator, from a fixed stream of latents so that the checkpoint is
    # a function of the training state alone (the next step overwrites these buffers again).
    stand = torch.Generator().manual_seed(config.seed + 2)
    n_stand = 8 * config.batch_size
    stand_z = torch.randn(n_stand, config.z_dim, generator=stand).to(dev)
    labels = train_set.labels
    stand_y = (labels[torch.randint(len(train_set.data), (n_stand,), generator=stand)].to(dev)
               if labels is not None else None)
    with autocast(dev):
        standing_statistics(G_ema, stand_z, stand_y, config.batch_size)
    path = save_checkpoint(run.out_dir, run.nets, run.optims, {"loop": run.gen.get_state()}, meta)
    with torch.no_grad():
        y = (torch.arange(min(len(train_set.classes), 16)).repeat_interleave(config.grid_size).to(dev)
             if labels is not None else None)
        with autocast(dev):
            images_out = G_ema(run.grid_z.to(dev), y)
    try:
        save_grid(images_out.float(), config.grid_size, run.out_dir / "grids" / f"grid-{step:08d}.png")
    except OSError as exc:  # a preview: the checkpoint is what counts, and it is written
        _log.warning(f"could not write the sample grid of step {step}: {os_error_message(exc)}")
    return path


def _remove_unfinished(out_dir: Path) -> list[Path]:
    """What killed writes left in a run folder: checkpoint files without their JSON, and the temporaries of
    checkpoints, grids, config.json, log.jsonl and the run's image cache. Called holding the run lock, so
    nothing is being written there."""
    removed = remove_unfinished(out_dir)
    for folder in (out_dir, out_dir / "grids", out_dir / "cache"):
        if folder.is_dir():
            for path in folder.glob("*.tmp-*"):
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


class _Room:
    """Disk space for the run's next checkpoint, held while it trains: taken before the first step (a folder
    that cannot hold a checkpoint fails then, not after the budget), given back just before each save and
    taken again after it. So a disk that other programs fill up meanwhile cannot cost the run its save."""

    def __init__(self, run: _Run) -> None:
        self.folder, self.sizes = checkpoint_dir(run.out_dir), estimated_size(run.nets, run.optims)
        try:
            self.files = reserve_room(self.folder, self.sizes)
        except OSError as exc:
            raise WriteFailed(f"{self.folder} cannot hold a checkpoint of this run ({sum(self.sizes) / 1e6:.1f} "
                              f"MB): {exc.strerror or exc}; stopped before training") from None

    def release(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files = []

    def renew(self) -> None:
        try:
            self.files = reserve_room(self.folder, self.sizes)
        except OSError as exc:   # the checkpoint just written is safe; the next save may fail and say so
            _log.warning(f"no room is left for the next checkpoint in {self.folder} ({exc.strerror or exc})")


def _checkpoint(run: _Run, step: int, nimg: int, elapsed_s: float, last: Path | None, room: _Room | None) -> Path:
    """`_save` into the space `room` held, unless the newest checkpoint already holds this step (the same
    state: saved once)."""
    if last is not None and checkpoint_step(last) == step:
        return last
    if room is not None:
        room.release()
    path = _save(run, step, nimg, elapsed_s)
    if room is not None:
        room.renew()
    return path


def _kept_work(last: Path | None, step: int, elapsed_s: float) -> str:
    """What a run that stops now keeps: its last good checkpoint and the work in it, or nothing."""
    if last is None:
        return (f"no checkpoint was written, so the {step} steps ({elapsed_s / 60:.2f} minutes) of this session "
                "are lost; free some space, then run the same command again")
    try:
        meta = RunMeta.from_json(last.with_suffix(".json").read_text(), last)
    except (OSError, UserError):
        return f"the last good checkpoint is {last}; continue with the same command plus --resume"
    return (f"the last good checkpoint is {last} (step {meta.step}, {meta.kimg:.2f} kimg, "
            f"{meta.elapsed_s / 60:.2f} minutes of training; the steps after it ({step - meta.step}) are lost); "
            "free some space, then continue with the same command plus --resume")


def _update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    """Parameters averaged, buffers (BatchNorm statistics) copied."""
    with torch.no_grad():
        for p_ema, p_cur in zip(G_ema.parameters(), G.parameters()):
            p_ema.lerp_(p_cur, 1 - beta)
        for b_ema, b_cur in zip(G_ema.buffers(), G.buffers()):
            b_ema.copy_(b_cur)


def _optimize(loss: torch.Tensor, opt: torch.optim.Optimizer, net: torch.nn.Module, world: int) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_mean_grads([net], world)
    opt.step()


# ----------------------------------------------------------------------------------------------------

def fit(folder: str | Path, config: TrainConfig | None = None, out_dir: str | Path | None = None, *,
        resume: bool = False, device: str = "auto", cache_dir: str | Path | None = None,
        progress: bool = True, checkpoint: str | Path | None = None, labels: str | Path | None = None,
        labeler: LabelerConfig | None = None) -> Path:
    """Train G, D and E on the images in `folder`; write checkpoints, grids and logs to `out_dir` (`augment-gan fit`).

    `config` defaults to `TrainConfig()` (5 wall-clock minutes at 32 px), `out_dir` to runs/<folder name>.
    Returns the path of the final checkpoint. With `resume=True`, continues the latest checkpoint in
    `out_dir` (step, kimg, adaptive p, optimizer, RNG and EMA state); only the fields in
    `RESUME_OVERRIDABLE` may differ from the saved config. `checkpoint` (with `resume`) continues from that
    checkpoint of the run instead of its newest, e.g. past a damaged one; the run's later checkpoints are
    moved to checkpoints/superseded/.

    `labels` (`fit UNLABELED --labels LABELED`): a folder of labeled images (class subfolders) for an unlabeled
    `folder`. A classifier trained on it labels `folder`, and the run trains class-conditionally on the labeled
    images plus those labelled with a confidence of at least `labeler.confidence` (`augment_gan.pseudolabel`;
    `labeler` defaults to `LabelerConfig()`). The labels are kept in RUN/pseudo_labels.json; a resumed run
    trains on them again.

    A crash leaves a run that the same command plus `resume=True` continues from its last complete
    checkpoint; a failed write (full disk) stops the run with a `WriteFailed` that says what is kept.
    """
    config = config if config is not None else TrainConfig()
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / (Path(folder).resolve().name or "run")
    rank, world, local_rank = dist_env()
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

    if checkpoint is not None and not resume:
        raise UserError("--checkpoint picks the checkpoint --resume continues; pass --resume too")
    if not Path(folder).is_dir():
        raise UserError(f"training folder not found: {folder}")
    if labels is not None:
        if not config.conditional:
            raise UserError("--labels trains a class-conditional run on the labeled classes; drop --unconditional")
        check_labeled_folder(labels)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a run directory")
    created = is_main and not out_dir.exists()
    try:
        lock = run_lock(out_dir) if is_main else contextlib.nullcontext()
        with lock, StopFlag() as stop:
            return _fit_locked(folder, config, out_dir, resume, checkpoint, dev, cache_dir, progress, rank, world,
                               stop, labels, labeler)
    except BaseException:
        # A fit that fails before training starts (a bad folder, no images) leaves no run directory behind.
        if created and not (out_dir / "log.jsonl").exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _fit_locked(folder, config: TrainConfig, out_dir: Path, resume: bool, checkpoint: str | Path | None,
                dev: torch.device, cache_dir, progress: bool, rank: int, world: int, stop: StopFlag,
                labels_dir: str | Path | None, labeler: LabelerConfig | None) -> Path:
    is_main = rank == 0
    removed = _remove_unfinished(out_dir) if is_main else []
    if removed:
        _log.warning(f"removed what an interrupted run left in {out_dir}: "
                     f"{', '.join(p.relative_to(out_dir).as_posix() for p in removed)}")
    saved = _saved_state(out_dir, config, resume, checkpoint)
    if saved is not None:
        check_same_labels(saved[3], labels_dir)

    # Load training set (with --labels: the labeled images and the confidently pseudo-labelled ones).
    cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    if labels_dir is None:
        train_set = load_training_set(folder, config, cache, progress, rank, world)
    else:
        train_set = load_labeled_training_set(folder, labels_dir, labeler or LabelerConfig(), config,
                                              out_dir / PSEUDO_LABELS, cache, progress, rank, world,
                                              resume=saved is not None, device=str(dev))
    if saved is not None:
        check_same_data(saved[3], train_set)
    n_images, labels = len(train_set.data), train_set.labels
    weights = sampling_weights(labels, config.class_sampling)
    images = images_on(dev, train_set.data)

    # Construct networks, optimizers and the loop's random stream; restore them when resuming.
    nets, optims = _build(config, train_set, dev)
    G, D, E, G_ema = nets["G"], nets["D"], nets["E"], nets["G_ema"]
    gen = torch.Generator().manual_seed(config.seed)
    ada = diffaug.AdaptiveP(config.ada_target, config.ada_kimg, config.ada_p_init, config.ada_p_max)
    step, nimg, elapsed_before = 0, 0, 0.0
    if saved is not None:
        nets_sd, optim_sd, rng_sd, meta = saved
        for name, net in nets.items():
            net.load_state_dict(nets_sd[name])
        for name, opt in optims.items():
            opt.load_state_dict(optim_sd[name])
        gen.set_state(rng_sd["loop"])
        ada.load_state(meta.ada)
        step, nimg, elapsed_before = meta.step, meta.nimg, meta.elapsed_s
    n_grid_rows = max(1, min(len(train_set.classes), 16)) if train_set.conditional else config.grid_size
    grid_z = torch.randn(config.grid_size * n_grid_rows, config.z_dim,
                         generator=torch.Generator().manual_seed(config.seed + 1))
    run = _Run(config, out_dir, dev, train_set, nets, optims, gen, ada, grid_z)
    layout = BatchLayout.build(config.batch_size, rank, world, config.selfsup_fraction)
    B = config.batch_size
    use_ms = config.mode_seeking_weight > 0
    if use_ms and (B // world) % 2:
        raise UserError(f"mode_seeking_weight > 0 needs an even per-rank batch, got {B // world}")
    objective = Objective(config, G, D, G_ema, E, device=dev, layout=layout, conditional=train_set.conditional,
                          mean=global_mean)
    budget = Budget(config, elapsed_before, is_main, world)
    if saved is not None and budget.done(nimg):
        raise UserError(budget.spent_message(nimg))
    moved = supersede_after(out_dir, step) if is_main and checkpoint is not None else []
    if moved:
        _log.warning(f"the run continues from step {step}; its later checkpoint files moved to "
                     f"{checkpoint_dir(out_dir) / SUPERSEDED}: {', '.join(p.name for p in moved)}")
    room = _Room(run) if is_main else None   # from here on, the space of one checkpoint is the run's
    existing = list_checkpoints(out_dir)
    last_path: Path | None = existing[-1] if existing else None
    logger: RunLogger | None = None
    try:
        # Bookkeeping: run config, log, checkpoints.
        if is_main:
            (out_dir / "grids").mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(out_dir / "config.json", (json.dumps(
                {"package_version": __version__, "config": config.to_dict(), "data": train_set.info.to_dict()},
                indent=2, sort_keys=True) + "\n").encode())
        logger = RunLogger(config, out_dir, step, nimg, is_main, progress)
        last_ckpt_time = time.monotonic()
        watch = FiniteWatch()

        # Train.
        while not budget.done(nimg):
            p = config.fixed_p if config.fixed_p is not None else ada.p
            draws = draw_step(gen, layout, config, p, n_images, labels, paired=use_ms, weights=weights).to(dev)
            x = images[draws.idx.to(images.device)].to(dev, non_blocking=True)
            x = to_float(x).contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else to_float(x)
            y = labels[draws.idx].to(dev) if labels is not None else None

            # Discriminator step: adversarial loss on augmented reals and fakes, plus D's tasks.
            D.requires_grad_(True)
            loss_d, d_real, logs = objective.d_loss(x, y, draws)
            ada.accumulate(d_real)
            watch.add("D", loss_d, step)
            _optimize(loss_d, optims["D"], D, world)

            # Generator step: fool D on augmented fakes, plus G's tasks.
            D.requires_grad_(False)
            loss_g, logs_g = objective.g_loss(draws)
            watch.add("G", loss_g, step)
            _optimize(loss_g, optims["G"], G, world)
            logs.update(logs_g)

            # EMA generator (sampling uses it).
            nimg += B
            _update_ema(G_ema, G, _ema_beta(config, B, nimg))

            # Latent encoder: invert the EMA generator (E's loss never reaches G or D).
            if config.encoder_weight > 0 and step % config.encoder_interval == 0:
                loss_e, logs_e = objective.encoder_loss(x, y, draws)
                watch.add("E", loss_e, step)
                _optimize(loss_e, optims["E"], E, world)
                logs.update(logs_e)

            # Adaptive augmentation probability.
            step += 1
            if config.fixed_p is None and step % config.ada_interval == 0:
                ada.update(B * config.ada_interval, dist.all_reduce if world > 1 else None)

            # Logging, checkpoints, stop requests.
            if step % config.log_every == 0:
                watch.check(step, last_path, world)
            logger.step(step, nimg, logs, p, ada, budget.elapsed())
            due = is_main and time.monotonic() - last_ckpt_time >= config.checkpoint_minutes * 60
            if any_rank(due, world) if world > 1 else due:   # rank 0's clock decides for every rank
                watch.check(step, last_path, world)
                if is_main:
                    last_path = _checkpoint(run, step, nimg, budget.elapsed(), last_path, room)
                last_ckpt_time = time.monotonic()
            if any_rank(stop.signal is not None, world):
                watch.check(step, last_path, world)
                if is_main:
                    last_path = _checkpoint(run, step, nimg, budget.elapsed(), last_path, room)
                raise Interrupted(f"interrupted at kimg {nimg / 1000:.2f}; saved {last_path}; "
                                  "continue with the same command plus --resume")
        watch.check(step, last_path, world)
        if is_main:
            last_path = _checkpoint(run, step, nimg, budget.elapsed(), last_path, room)
        if world > 1:
            dist.barrier()
            last_path = list_checkpoints(out_dir)[-1]   # every rank returns the checkpoint rank 0 wrote
    except OSError as exc:   # a full disk, a folder gone read-only: say what the run keeps
        raise WriteFailed(f"stopped at step {step}: {os_error_message(exc)}; "
                          f"{_kept_work(last_path, step, budget.elapsed())}") from None
    finally:
        if logger is not None:
            logger.close()
        if room is not None:
            room.release()
    return last_path
