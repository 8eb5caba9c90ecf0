"""Checkpoints: safetensors weights + JSON metadata, optimizer/RNG state beside them. Never pickled.

A checkpoint `RUN/checkpoints/ckpt-<step>.safetensors` holds G, G_ema, D and E weights, with the JSON
metadata (package version, full config, classes, channels, step, kimg, adaptive p) embedded in its
header, so the file alone rebuilds the networks. `ckpt-<step>.json` repeats the metadata for humans and
tools, and `ckpt-<step>.state.safetensors` holds what resuming needs (optimizer moments, RNG states).
Every file is written to a temporary name and renamed; the JSON is written last and marks the checkpoint
complete.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from augment_gan.atomic import write_bytes_atomic
from augment_gan.config import TrainConfig
from augment_gan.errors import UserError
from augment_gan.models import Discriminator, Encoder, Generator, build_networks
from augment_gan.runmeta import RunMeta
_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")
NETWORKS = ("G", "G_ema", "D", "E")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


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


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ folder, a weights file or its .json -> the weights file."""
    path = Path(path)
    if path.is_dir():
        run_dir = path.parent if path.name == "checkpoints" else path
        found = list_checkpoints(run_dir)
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


def save_checkpoint(run_dir: Path, networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    rng: dict[str, torch.Tensor], meta: RunMeta) -> Path:
    """Write one complete checkpoint (named by `meta.step`) atomically; returns the weights path."""
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
    write_bytes_atomic(base.with_suffix(".safetensors"), st_save(weights, metadata={"augment_gan": meta_json}))
    write_bytes_atomic(base.with_suffix(".state.safetensors"),
                       st_save(state, metadata={"param_groups": json.dumps(groups)}))
    write_bytes_atomic(base.with_suffix(".json"), (meta.to_json(indent=2) + "\n").encode())
    return base.with_suffix(".safetensors")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        data = path.read_bytes()
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
    except (OSError, SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read checkpoint file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return tensors, header.get("__metadata__", {}) or {}


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
    """The metadata embedded in a weights file."""
    _, header = _read_safetensors(Path(path))
    return _meta_from_header(Path(path), header)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a run directory or checkpoint file for sampling (no optimizer state, no pickle)."""
    path = resolve_checkpoint(path)
    tensors, header = _read_safetensors(path)
    meta = _meta_from_header(path, header)
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


def load_training_state(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict], dict[str, torch.Tensor], RunMeta]:
    """For --resume: (network state dicts, optimizer state dicts, RNG states, metadata)."""
    path = resolve_checkpoint(path)
    tensors, header = _read_safetensors(path)
    meta = _meta_from_header(path, header)
    nets = {name: {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            for name in NETWORKS}
    state_path = path.with_name(path.name.replace(".safetensors", ".state.safetensors"))
    if not state_path.exists():
        raise UserError(f"cannot resume: {state_path} (optimizer and RNG state) is missing")
    state, state_header = _read_safetensors(state_path)
    groups = json.loads(state_header["param_groups"])
    optims = {name: _unflatten_optimizer(f"opt.{name}", state, g) for name, g in groups.items()}
    rng = {k[4:]: v for k, v in state.items() if k.startswith("rng.")}
    return nets, optims, rng, meta
