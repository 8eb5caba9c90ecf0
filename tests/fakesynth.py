"""A fake `augment-gan synth` output made of real images, so dataset/merge/example tests need no trained GAN.

The layout and manifest keys follow the synth contract: conditional -> OUT/<class>/<index:06d>.png,
unconditional -> OUT/<index:06d>.png, OUT/manifest.jsonl (one JSON object per image) and OUT/synth.json.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

FAKE_DIGEST = "0" * 64


def copy_classes(src: Path, dst: Path, start: int, stop: int, classes: tuple[str, ...] | None = None) -> Path:
    """An ImageFolder at `dst` with files [start, stop) (sorted) of every class folder of `src`, or only of
    the named `classes`."""
    for d in sorted(p for p in src.iterdir() if p.is_dir() and (classes is None or p.name in classes)):
        (dst / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[start:stop]:
            shutil.copy(f, dst / d.name / f.name)
    return dst


def write_fake_synth(source: Path, out: Path, *, classes: list[str] | None = None, per_class: int = 10,
                     rejected_per_class: int = 2, conditional: bool = True, size: int | None = None) -> Path:
    """Copy `per_class` real images of each class folder of `source` into a synth-style folder at `out`.

    The first `rejected_per_class` images of each class are written but marked `kept: false` (as synth's
    filters do). Images are re-encoded as PNG (resized to `size` when given, like a generator at a
    fixed resolution). Returns `out`.
    """
    source, out = Path(source), Path(out)
    names = classes if classes is not None else sorted(p.name for p in source.iterdir() if p.is_dir())
    out.mkdir(parents=True, exist_ok=True)
    records = []
    index = 0
    for label, name in enumerate(names):
        files = sorted(p for p in (source / name).iterdir() if p.suffix.lower() == ".png")
        for j, file in enumerate(files[: per_class + rejected_per_class]):
            rel = f"{name}/{index:06d}.png" if conditional else f"{index:06d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            image = Image.open(file)
            image = image.convert("L") if image.mode in ("1", "L") else image.convert("RGBA").convert("RGB")
            if size is not None:
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            image.save(out / rel)
            rejected = j < rejected_per_class
            records.append({
                "file": rel, "index": index, "seed": 0,
                "class": name if conditional else None, "label": label if conditional else None,
                "truncation": 1.0, "checkpoint": FAKE_DIGEST, "d_score": 0.0,
                "kept": not rejected, "filter": "d_score" if rejected else None,
            })
            index += 1
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "synth.json").write_text(json.dumps({
        "checkpoint": {"path": "fake.safetensors", "digest": FAKE_DIGEST},
        "classes": names if conditional else [], "seed": 0, "n": index, "format": "png", "filters": ["d_score"],
    }))
    return out


def write_tiny_checkpoint(run: Path, classes: list[str], channels: int = 1) -> Path:
    """An untrained 32 px checkpoint (random weights) written by the real checkpoint code: enough to test
    the plumbing of on-the-fly generation, not image quality. Returns the weights file."""
    import torch

    from augment_gan.checkpoint import save_checkpoint
    from augment_gan.config import TrainConfig
    from augment_gan.models import build_networks
    from augment_gan.runmeta import RunMeta

    config = TrainConfig(resolution=32, z_dim=16, g_channels=32, d_channels=16, min_channels=8, max_channels=32)
    torch.manual_seed(0)
    g, d, e = build_networks(config, channels, len(classes))
    g_ema, _, _ = build_networks(config, channels, len(classes))
    g_ema.load_state_dict(g.state_dict())
    meta = RunMeta(config=config, conditional=bool(classes), classes=tuple(classes), channels=channels)
    return save_checkpoint(Path(run), {"G": g, "G_ema": g_ema, "D": d, "E": e}, {}, {}, meta)
