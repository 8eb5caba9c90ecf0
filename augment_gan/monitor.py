"""What fit's loop watches and records: the budget, non-finite losses, and log.jsonl / TensorBoard / the
progress bar."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from augment_gan import diffaug
from augment_gan.atomic import write_bytes_atomic
from augment_gan.config import TrainConfig
from augment_gan.distributed import any_rank
from augment_gan.errors import UserError


class TrainingDiverged(UserError):
    """A loss became NaN or inf; the run stops and keeps its last good checkpoint."""


class Budget:
    """When to stop: after `kimg` thousand images, or `minutes` on the run's clock (wall or CPU time)."""

    def __init__(self, config: TrainConfig, elapsed_before: float, is_main: bool, world: int) -> None:
        self.config, self.elapsed_before, self.is_main, self.world = config, elapsed_before, is_main, world
        self.clock = time.process_time if config.clock == "cpu" else time.monotonic
        self.t_start = self.clock()

    def elapsed(self) -> float:
        """Budget used so far, including what earlier sessions of a resumed run used (`elapsed_s`)."""
        return self.elapsed_before + (self.clock() - self.t_start)

    def done(self, nimg: int) -> bool:
        if self.config.kimg is not None:
            return nimg >= self.config.kimg * 1000
        done = self.elapsed() >= self.config.minutes * 60
        # Clocks differ between ranks: rank 0 decides for everyone.
        return any_rank(done and self.is_main, self.world) if self.world > 1 else done

    def spent_message(self, nimg: int) -> str:
        if self.config.kimg is not None:
            used, limit = f"{nimg / 1000:g} kimg", f"--kimg {self.config.kimg:g}"
            hint = "a larger --kimg"
        else:
            used, limit = f"{self.elapsed() / 60:.2f} minutes", f"--minutes {self.config.minutes:g}"
            hint = "a larger --minutes (the total for the run, not the extra time)"
        return (f"--resume: the run has already used its budget ({used}, {limit}); "
                f"pass {hint} to continue it")


class FiniteWatch:
    """Watches the losses for NaN/inf without a host-device sync per step: the flags stay on the device and
    `check` reads them every `log_every` steps and before every checkpoint, so a NaN state is never saved."""

    def __init__(self) -> None:
        self.first_bad: dict[str, torch.Tensor] = {}   # loss name -> first step it was not finite (-1: never)

    def add(self, name: str, loss: torch.Tensor, step: int) -> None:
        ok = torch.isfinite(loss.detach()).all()
        prev = self.first_bad.get(name)
        if prev is None:
            prev = torch.full((), -1, dtype=torch.long, device=loss.device)
        self.first_bad[name] = torch.where(ok | (prev >= 0), prev, torch.full_like(prev, step))

    def check(self, step: int, last: Path | None, world: int) -> None:
        bad = {name: int(t) for name, t in self.first_bad.items() if int(t) >= 0}
        if any_rank(bool(bad), world):
            name, at = min(bad.items(), key=lambda kv: kv[1]) if bad else ("another rank's", step)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(f"{name} loss became NaN/inf at step {at} (noticed at step {step}); stopped "
                                   f"without saving; {where} (try a lower learning rate or --config with r1_gamma > 0)")


class RunLogger:
    """Averages the step's losses over `log_every` steps into log.jsonl, TensorBoard and the progress bar."""

    def __init__(self, config: TrainConfig, out_dir: Path, step: int, nimg: int, is_main: bool,
                 progress: bool) -> None:
        self.config, self.is_main = config, is_main
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}  # steps that logged each loss (E's only every encoder_interval steps)
        self.window_start, self.window_nimg = time.monotonic(), nimg
        self.file = open_log(out_dir / "log.jsonl", step) if is_main else None
        self.tb = tensorboard_writer(out_dir) if is_main else None
        self.total = config.kimg
        self.bar = tqdm(total=config.kimg, unit="kimg", disable=not (progress and is_main), file=sys.stderr,
                        initial=nimg / 1000,
                        bar_format="{l_bar}{bar}| {n:.2f}/{total} kimg [{elapsed}<{remaining}{postfix}]"
                        if config.kimg else "{desc} {n:.2f} kimg [{elapsed}{postfix}]")

    def step(self, step: int, nimg: int, logs: dict[str, torch.Tensor], p: float, ada: diffaug.AdaptiveP,
             elapsed_s: float) -> None:
        for k, v in logs.items():   # summed on the device; read once per log_every steps
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
            self.counts[k] = self.counts.get(k, 0) + 1
        # The last step may pass the kimg budget by up to one batch: the bar stops at its total.
        self.bar.n = min(nimg / 1000, self.total) if self.total else nimg / 1000
        if step % 10 == 0:
            self.bar.refresh()
        if step % self.config.log_every:
            return
        now = time.monotonic()
        record = {"step": step, "kimg": round(nimg / 1000, 4), "time_s": round(elapsed_s, 3),
                  "img_per_s": round((nimg - self.window_nimg) / max(now - self.window_start, 1e-9), 2),
                  "p": round(p, 5), "rt": round(ada.rt, 5),
                  **{k: round(float(v) / self.counts[k], 6) for k, v in self.sums.items()}}
        self.sums, self.counts, self.window_start, self.window_nimg = {}, {}, now, nimg
        if not self.is_main:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
        self.bar.set_postfix({"img/s": record["img_per_s"], "D": record.get("loss_d"),
                              "G": record.get("loss_g"), "p": record["p"]}, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def open_log(path: Path, step: int):
    """log.jsonl for appending, without the rows of steps after `step` (a resumed run redoes those steps)."""
    kept = []
    if step > 0 and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    write_bytes_atomic(path, "".join(kept).encode())
    return open(path, "a")


def tensorboard_writer(out_dir: Path):
    """A SummaryWriter when tensorboard is installed (optional extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out_dir / "tensorboard"))
