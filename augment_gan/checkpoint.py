"""Checkpoints: safetensors weights + JSON metadata, optimizer/RNG state beside them. Never pickled.

A checkpoint `RUN/checkpoints/ckpt-<step>.safetensors` holds G, G_ema, D and E weights, with the JSON
metadata (package version, full config, classes, channels, step, kimg, adaptive p) embedded in its
header, so the file alone rebuilds the networks. `ckpt-<step>.json` repeats the metadata for humans and
tools, and `ckpt-<step>.state.safetensors` holds what resuming needs (optimizer moments, RNG states).
Every file is written to a temporary name and renamed; the JSON is written last and marks the checkpoint
complete.

What a crash leaves, and who deals with it
    A checkpoint counts once its JSON exists. A save that was killed leaves at most `*.tmp-<pid>` files and
    weights (or state) without their JSON: readers ignore them, with a warning naming the file when they are
    newer than the checkpoint used, and the next `fit` of the run removes them (it holds the run lock). A save
    that fails (full disk) removes what it wrote, so the previous checkpoint stays the newest.

Damaged or foreign checkpoints
    Loading a run directory uses its newest checkpoint and checks it: the weights must read, the JSON must
    parse and describe the same checkpoint, and its config, classes and channels must be the run's
    (RUN/config.json, else the run's other checkpoints). A check that fails is a one-line error naming the
    file and the newest valid checkpoint of the run, never a silent fall back: to use that one, pass its file
    (synth/vary: as RUN; fit: `--resume --checkpoint FILE`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from augment_gan.atomic import open_atomic
from augment_gan.config import TrainConfig, run_differences
from augment_gan.errors import UserError
from augment_gan.models import Discriminator, Encoder, Generator, build_networks
from augment_gan.runmeta import DataInfo, RunMeta

_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")
_FILE = re.compile(r"^ckpt-(\d{8,})\.(safetensors|state\.safetensors|json)$")
"""Any of the three files of a checkpoint."""
NETWORKS = ("G", "G_ema", "D", "E")
SUPERSEDED = "superseded"
"""Subfolder of checkpoints/ that `fit --resume --checkpoint FILE` moves the run's later checkpoints to."""
_log = logging.getLogger(__name__)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint file's name (`ckpt-<step>.safetensors`, `.state.safetensors`, `.json`)."""
    m = _FILE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (weights and JSON both present), oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and p.with_suffix(".json").exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def unfinished_files(run_dir: Path) -> list[Path]:
    """What interrupted saves left in RUN/checkpoints: temporaries, and checkpoint files without their JSON."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    complete = {checkpoint_step(p) for p in list_checkpoints(run_dir)}
    return sorted(p for p in folder.iterdir() if p.is_file() and (
        ".tmp-" in p.name or (checkpoint_step(p) is not None and checkpoint_step(p) not in complete)))


def remove_unfinished(run_dir: Path) -> list[Path]:
    """Delete `unfinished_files` (fit calls this holding the run lock, so no save is in progress)."""
    removed = unfinished_files(run_dir)
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def supersede_after(run_dir: Path, step: int) -> list[Path]:
    """Move the run's checkpoint files of later steps into checkpoints/superseded/ (never deleted)."""
    folder = checkpoint_dir(run_dir)
    later = sorted(p for p in folder.iterdir() if (checkpoint_step(p) or -1) > step) if folder.is_dir() else []
    if later:
        (folder / SUPERSEDED).mkdir(exist_ok=True)
        for p in later:
            os.replace(p, folder / SUPERSEDED / p.name)
    return later


def _run_dir_of(path: Path) -> Path:
    return path.parent if path.name == "checkpoints" else path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ folder, a weights file or its .json -> the weights file.

    For a run directory: its newest complete checkpoint; unfinished newer files are named in a warning.
    """
    path = Path(path)
    if path.is_dir():
        run_dir = _run_dir_of(path)
        found = list_checkpoints(run_dir)
        newest = checkpoint_step(found[-1]) if found else -1
        ignored = [p for p in unfinished_files(run_dir) if (checkpoint_step(p) or -1) > newest]
        if ignored:
            _log.warning(f"ignoring {', '.join(str(p) for p in ignored)}: a checkpoint whose save has not finished "
                         "(a checkpoint counts once its .json is written); if no fit is running, the next `fit` "
                         "of the run removes them")
        if not found:
            raise UserError(f"{path} holds no checkpoint (expected {checkpoint_dir(run_dir)}/ckpt-*.safetensors)")
        return found[-1]
    if path.suffix == ".json" and path.with_suffix(".safetensors").exists():
        return path.with_suffix(".safetensors")
    if path.suffix == ".safetensors" and path.exists():
        return path
    if not path.exists():
        raise UserError(f"checkpoint or run directory not found: {path}")
    raise UserError(f"not a checkpoint: {path} (expected a run directory or a .safetensors file)")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{prefix}.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def _unflatten_optimizer(prefix: str, tensors: dict[str, torch.Tensor], groups: Any) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith(prefix + "."):
            idx, key = name[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def estimated_size(networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> tuple[int, int]:
    """Bytes of a checkpoint's (weights, state) files, an upper estimate (Adam holds two moments per
    parameter once it has stepped, whatever its state now)."""
    weights = sum(t.numel() * t.element_size() + 256 for net in networks.values() for t in net.state_dict().values())
    state = sum(2 * p.numel() * p.element_size() + 1024 for opt in optimizers.values()
                for group in opt.param_groups for p in group["params"])
    return weights + 65536, state + 65536


# Fault injection for tests/test_faults.py, off unless the variable is set: AUGMENT_GAN_TEST_KILL_AT=k makes
# the process SIGKILL itself at the k-th point of `save_checkpoint` (three per file: half its bytes in the
# temporary file, all of them, renamed into place), so a test can stop a save at any moment of its writes.
_KILL_AT = "AUGMENT_GAN_TEST_KILL_AT"
_points_passed = 0


def _fault_point() -> None:
    global _points_passed
    at = os.environ.get(_KILL_AT)
    if at:
        _points_passed += 1
        if _points_passed == int(at):
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _write(path: Path, data: bytes) -> None:
    view = memoryview(data)
    with open_atomic(path) as f:
        f.write(view[:len(view) // 2])
        if os.environ.get(_KILL_AT):
            f.flush()
        _fault_point()
        f.write(view[len(view) // 2:])
        _fault_point()
    _fault_point()


def save_checkpoint(run_dir: Path, networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    rng: dict[str, torch.Tensor], meta: RunMeta) -> Path:
    """Write one complete checkpoint (named by `meta.step`) atomically; returns the weights path.

    When a write fails (full disk, read-only folder) the files this call already wrote are removed, so the
    run's previous checkpoint stays its newest, and the error is raised.
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    step = meta.step
    meta_json = meta.to_json()
    weights = {f"{name}.{k}": v.detach().cpu().contiguous()
               for name, net in networks.items() for k, v in net.state_dict().items()}
    state: dict[str, torch.Tensor] = {f"rng.{k}": v.cpu().contiguous() for k, v in rng.items()}
    groups = {}
    for name, opt in optimizers.items():
        tensors, groups[name] = _flatten_optimizer(f"opt.{name}", opt)
        state.update(tensors)
    base = folder / f"ckpt-{step:08d}"
    files = [(base.with_suffix(".safetensors"), st_save(weights, metadata={"augment_gan": meta_json})),
             (base.with_suffix(".state.safetensors"), st_save(state, metadata={"param_groups": json.dumps(groups)})),
             (base.with_suffix(".json"), (meta.to_json(indent=2) + "\n").encode())]  # last: marks it complete
    written: list[Path] = []
    try:
        for path, data in files:
            _write(path, data)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return base.with_suffix(".safetensors")


def _metadata(header_bytes: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors header (the JSON after its 8-byte length)."""
    header = json.loads(header_bytes)
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise ValueError("malformed header")
    return header.get("__metadata__", {}) or {}


def _read_error(path: Path, exc: Exception) -> UserError:
    return UserError(f"cannot read checkpoint file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        metadata = _metadata(data[8:8 + int.from_bytes(data[:8], "little")])
    except (OSError, SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise _read_error(path, exc) from None
    return tensors, metadata


@dataclass
class Checkpoint:
    """Networks and metadata of one checkpoint, ready for sampling (modules in eval mode)."""

    path: Path
    meta: RunMeta
    config: TrainConfig
    G: Generator
    G_ema: Generator
    D: Discriminator
    E: Encoder
    digest: str

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def channels(self) -> int:
        return self.meta.channels

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def step(self) -> int:
        return self.meta.step


def _meta_from_header(path: Path, header: dict[str, str]) -> RunMeta:
    if "augment_gan" not in header:
        raise UserError(f"{path} is a safetensors file but not an augment-gan checkpoint")
    return RunMeta.from_json(header["augment_gan"], path)


def read_meta(path: Path) -> RunMeta:
    """The metadata embedded in a weights file, read from its header alone (the tensors are not loaded)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = _metadata(f.read(int.from_bytes(f.read(8), "little")))
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise _read_error(path, exc) from None
    return _meta_from_header(path, metadata)


def _state_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", ".state.safetensors"))


def _run_reference(run_dir: Path, exclude: Path) -> tuple[Path, TrainConfig, DataInfo] | None:
    """What a run's checkpoints must agree with: RUN/config.json (fit writes it), else the JSON of the
    run's oldest other checkpoint; None when neither is readable."""
    candidates = [Path(run_dir) / "config.json"] + [p.with_suffix(".json") for p in list_checkpoints(run_dir)
                                                    if p != exclude]
    for source in candidates:
        try:
            data = json.loads(source.read_text())
            return source, TrainConfig.from_dict(dict(data["config"])), DataInfo.from_dict(data.get("data"))
        except (OSError, ValueError, KeyError, TypeError, UserError):
            continue
    return None


def _check_run(run_dir: Path, path: Path, meta: RunMeta) -> None:
    """A checkpoint found in a run directory must be one of that run's: same config, classes, channels."""
    reference = _run_reference(run_dir, path)
    if reference is None:
        return
    source, config, data = reference
    problems = []
    if data.classes and meta.data.classes and tuple(meta.data.classes) != tuple(data.classes):
        problems.append(f"classes {list(meta.data.classes)} (the run's: {list(data.classes)})")
    if data.channels and meta.channels != data.channels:
        problems.append(f"{meta.channels} channels (the run's: {data.channels})")
    fields = run_differences(meta.config, config)
    if fields:
        problems.append(f"config {', '.join(fields)}")
    if problems:
        raise UserError(f"{path} is not a checkpoint of this run: its {'; '.join(problems)} differ from {source}")


def _read_checked(path: Path, run_dir: Path | None, need_state: bool
                  ) -> tuple[dict[str, torch.Tensor], RunMeta, tuple[dict[str, torch.Tensor], dict[str, str]] | None]:
    """Read a weights file and check it: its JSON (required in a run directory) and, in a run directory,
    that it belongs to the run; with `need_state`, that its optimizer/RNG state reads too. Returns the
    weights, the metadata and (with `need_state`) the state file's tensors and header, read once."""
    tensors, header = _read_safetensors(path)
    meta = _meta_from_header(path, header)
    sidecar = path.with_suffix(".json")
    if run_dir is not None or sidecar.exists():
        try:
            text = sidecar.read_text()
        except OSError as exc:
            raise UserError(f"cannot read {sidecar}: {exc.strerror or exc}") from None
        described = RunMeta.from_json(text, sidecar)
        if (described.step, described.config, described.classes, described.channels) != \
                (meta.step, meta.config, meta.classes, meta.channels):
            raise UserError(f"{sidecar} does not describe {path.name} (its step, config, classes or channels "
                            "differ from the weights file's own metadata)")
    if run_dir is not None:
        _check_run(run_dir, path, meta)
    if need_state:
        state_path = _state_path(path)
        if not state_path.exists():
            raise UserError(f"cannot resume: {state_path} (optimizer and RNG state) is missing")
        return tensors, meta, _read_safetensors(state_path)
    return tensors, meta, None


def _fallback_hint(run_dir: Path, bad: Path, need_state: bool) -> str:
    """Where to go from a damaged newest checkpoint: the newest older one that passes every check."""
    for older in reversed([p for p in list_checkpoints(run_dir) if p != bad]):
        try:
            _read_checked(older, run_dir, need_state)
        except UserError:
            continue
        return (f"; the newest valid checkpoint of this run is {older}: to use it, pass that file instead of the "
                "run directory (fit: --resume --checkpoint FILE)")
    return "; the run has no other valid checkpoint"


def _open(path: str | Path, run_dir: str | Path | None = None, need_state: bool = False
          ) -> tuple[Path, dict[str, torch.Tensor], RunMeta, tuple[dict[str, torch.Tensor], dict[str, str]] | None]:
    """Resolve and read a checkpoint with every check; a run directory (given, or `run_dir`) adds the
    run checks, and a failure then names the newest valid checkpoint instead of silently using it."""
    given = Path(path)
    resolved = resolve_checkpoint(given)
    run = Path(run_dir) if run_dir is not None else (_run_dir_of(given) if given.is_dir() else None)
    try:
        tensors, meta, state = _read_checked(resolved, run, need_state)
    except UserError as exc:
        if run is None:
            raise
        raise UserError(f"{exc}{_fallback_hint(run, resolved, need_state)}") from None
    return resolved, tensors, meta, state


def resume_point(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """The checkpoint `fit --resume` continues, after every check: the run's newest, or `checkpoint`
    (a complete checkpoint in the run's checkpoints/ folder, for going back past a damaged one)."""
    return _open(resume_choice(Path(run_dir), checkpoint), run_dir=run_dir, need_state=True)[0]


def resume_choice(run_dir: Path, checkpoint: str | Path | None) -> Path:
    """What `--resume` continues, before reading it: the run directory (its newest checkpoint) or
    `checkpoint`, which must be a complete checkpoint of the run."""
    if checkpoint is None:
        if not list_checkpoints(run_dir):
            raise UserError(f"--resume: {run_dir} has no checkpoint to resume from; run the same command without "
                            "--resume to start it from step 0")
        return run_dir
    path = resolve_checkpoint(checkpoint)
    if path.resolve().parent != checkpoint_dir(run_dir).resolve():
        raise UserError(f"--checkpoint {checkpoint} is not in {checkpoint_dir(run_dir)}; resume a run from one of "
                        "its own checkpoints")
    if path.resolve() not in {p.resolve() for p in list_checkpoints(run_dir)}:
        raise UserError(f"--checkpoint {checkpoint} is not a complete checkpoint (its .json is missing)")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a run directory or checkpoint file for sampling (no optimizer state, no pickle).

    A run directory gives its newest checkpoint after the checks in this module's docstring.
    """
    path, tensors, meta, _ = _open(path)
    config = meta.config
    g, d, e = build_networks(config, meta.channels, meta.num_classes)
    g_ema, _, _ = build_networks(config, meta.channels, meta.num_classes)
    nets = {"G": g, "G_ema": g_ema, "D": d, "E": e}
    for name, net in nets.items():
        prefix = name + "."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            net.load_state_dict(sd)
        except RuntimeError as exc:
            raise UserError(f"{path}: weights of {name} do not match its config ({str(exc).splitlines()[0]})") from None
        net.to(device).eval().requires_grad_(False)
    return Checkpoint(path=path, meta=meta, config=config, G=g, G_ema=g_ema, D=d, E=e, digest=file_digest(path))


def load_training_state(path: Path, run_dir: Path | None = None) -> tuple[
        dict[str, dict[str, torch.Tensor]], dict[str, dict], dict[str, torch.Tensor], RunMeta]:
    """For --resume: (network state dicts, optimizer state dicts, RNG states, metadata), every file read once;
    `run_dir` adds the checks that the checkpoint belongs to that run (and `path` may be the run directory:
    its newest checkpoint)."""
    path, tensors, meta, (state, state_header) = _open(path, run_dir=run_dir, need_state=True)
    nets = {name: {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            for name in NETWORKS}
    state_path = _state_path(path)
    try:
        groups = json.loads(state_header["param_groups"])
        optims = {name: _unflatten_optimizer(f"opt.{name}", state, g) for name, g in groups.items()}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot resume: {state_path} holds no usable optimizer state ({exc!r})") from None
    rng = {k[4:]: v for k, v in state.items() if k.startswith("rng.")}
    return nets, optims, rng, meta
