"""The sampling pipeline: per-index latents (and labels) through the EMA generator to uint8 images.

Sample i is a pure function of (checkpoint, seed, i): its latent comes from a counter-based generator keyed
by (seed, i), so batch size, sharding, resuming and the order of indices never change an image.
Nothing here holds training state; `synth` and `vary` compose these functions: `latents` -> `decode`
(G_ema; `generate` = both), `decode_batches` (the same over a stream of indices, in parallel generator
lanes), and `encode` (the latent encoder E) for variations of real images.

Truncation is the ψ-truncation of StyleGAN (Karras et al. 2019) toward the mean latent. Our G takes z
directly (no mapping network) and z ~ N(0, I), whose mean is 0, so it is z·ψ: ψ=1 leaves the prior alone,
ψ<1 trades diversity for typicality, ψ=0 gives one image per class.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from augment_gan.errors import UserError
from augment_gan.pixels import to_float, to_uint8


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from a hash of `parts` (ints and strings), stable across processes and platforms.

    Python's `hash` is salted per process and consecutive integer seeds give correlated-looking streams in
    some generators, so the parts go through BLAKE2b instead.
    """
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


LATENT_SCHEME = "splitmix64(seed, index, j) + Box-Muller, float64 -> float32"
"""How `latents` turns (seed, index) into numbers; recorded by `synth` so a set never mixes two schemes."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014), element-wise on uint64 (products wrap mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def latents(seed: int, indices: Sequence[int] | torch.Tensor, z_dim: int) -> torch.Tensor:
    """float32 N×z_dim standard-normal latents; row k depends only on (seed, indices[k]).

    Counter-based, so a whole batch is a few vectorised numpy operations (about 4 µs of CPU per index at
    z_dim 128 in batches of 256, vs 11 µs for a seeded torch.Generator per index; benchmarks/bench_synth.py
    prints it): each index gets a 64-bit key mixed from `derive_seed(seed)` and the index, the key's
    SplitMix64 stream gives uniform pairs, and Box-Muller turns them into normals. The same on every device
    and for every batching of the indices; computed in float64 and rounded to float32, so another CPU's
    libm could change a value only when it lands within one float64 ulp of a float32 rounding boundary.
    """
    idx = np.asarray(indices.tolist() if isinstance(indices, torch.Tensor) else list(indices), dtype=np.int64)
    if idx.size and int(idx.min()) < 0:
        raise UserError(f"sample indices must be >= 0, got {int(idx.min())}")
    if idx.size == 0:
        return torch.empty(0, z_dim)
    with np.errstate(over="ignore"):
        key = _mix64(np.uint64(derive_seed(seed)) ^ _mix64(idx.astype(np.uint64) * _GOLDEN + _GOLDEN))
        half = (z_dim + 1) // 2
        steps = np.arange(1, 2 * half + 1, dtype=np.uint64) * _GOLDEN
        bits = _mix64(key[:, None] + steps[None, :])                      # N × 2·half uniform words
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53    # in (0, 1), 53 bits
    radius = np.sqrt(-2.0 * np.log(u[:, :half]))
    angle = 2.0 * np.pi * u[:, half:]
    z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1)[:, :z_dim]
    return torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))


def balanced_labels(indices: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """LongTensor N: class `i % num_classes` for index i — the round-robin plan `synth` uses by default."""
    index_tensor = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    return index_tensor % num_classes


# CPU GEMM kernels (MKL, oneDNN) compute rows in micro-tiles of 4-16; rows of a partial tile take another code
# path whose float sums can differ in the last bit, and after rounding to uint8 that flips a pixel in about 5% of
# images. Padding every call to a multiple of 16 rows keeps each real row in a full tile, so an image's bytes do
# not depend on the batch size or on which other indices share its batch (checked in tests/test_sample.py).
ROW_ALIGN = 16


def aligned_forward(fn: Any, x: torch.Tensor, *rest: torch.Tensor | None) -> Any:
    """`fn(x, *rest)` with the batch zero-padded to a multiple of `ROW_ALIGN` rows; outputs cut back to N.

    `rest` are per-row tensors (labels) or None; tuple outputs (E's mu, logvar) are cut element-wise.
    """
    n = x.shape[0]
    pad = -n % ROW_ALIGN
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
        rest = tuple(None if r is None else torch.cat([r, r.new_zeros((pad, *r.shape[1:]))]) for r in rest)
    out = fn(x, *rest)
    if isinstance(out, tuple):
        return tuple(o[:n] for o in out)
    return out[:n]


def check_truncation(truncation: float) -> float:
    if not 0.0 <= truncation <= 2.0:
        raise UserError(f"truncation ψ must be in [0, 2], got {truncation}")
    return float(truncation)


def generate(
    ckpt: Any,
    indices: Sequence[int] | torch.Tensor,
    *,
    seed: int,
    labels: Sequence[int] | torch.Tensor | None = None,
    truncation: float = 1.0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """uint8 N×C×H×W images of `indices` from the checkpoint's EMA generator (on the CPU when returned).

    `labels` are indices into `ckpt.classes`; for a conditional checkpoint they default to the balanced
    plan `i % num_classes`, so `generate(ckpt, range(n), seed=s)` reproduces `synth --n n --seed s`
    without filters. An unconditional checkpoint takes no labels.
    """
    truncation = check_truncation(truncation)
    z = latents(seed, indices, ckpt.z_dim)
    y = None
    if ckpt.num_classes:
        y = balanced_labels(indices, ckpt.num_classes) if labels is None else torch.as_tensor(labels, dtype=torch.long)
    elif labels is not None:
        raise UserError("this checkpoint is unconditional: it takes no labels")
    return decode(ckpt, z * truncation, y, device=device)


def decode(ckpt: Any, z: torch.Tensor, labels: Sequence[int] | torch.Tensor | None = None, *,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """Latents N×z_dim (+ labels for a conditional checkpoint) -> uint8 N×C×H×W on the CPU, via G_ema."""
    return to_uint8(decode_float(ckpt, z, labels, device=device)).cpu()


def decode_float(ckpt: Any, z: torch.Tensor, labels: Sequence[int] | torch.Tensor | None = None, *,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """Like `decode`, but G's float output N×C×H×W in [-1, 1], left on `device`.

    For callers that convert to uint8 elsewhere (`synth` does it on its encoder threads).
    """
    device = torch.device(device)
    y = None
    if ckpt.num_classes:
        if labels is None:
            raise UserError("this checkpoint is class-conditional: give a label for every latent")
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if y.shape != (len(z),):
            raise UserError(f"got {y.numel()} labels for {len(z)} latents")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= ckpt.num_classes):
            raise UserError(f"labels must be in [0, {ckpt.num_classes}), got {sorted(set(y.tolist()))}")
        y = y.to(device)
    elif labels is not None:
        raise UserError("this checkpoint is unconditional: it takes no labels")
    if len(z) == 0:
        return torch.empty(0, ckpt.channels, ckpt.resolution, ckpt.resolution, device=device)
    with torch.inference_mode():
        return aligned_forward(ckpt.G_ema, z.to(device), y)  # N×C×H×W in [-1, 1]


def default_batch_size(resolution: int) -> int:
    # 256 saturates 2 CPU cores at 32-64px (benchmarks/bench_synth.py); keep activations bounded above that.
    return 256 if resolution <= 64 else max(16, 256 * 64 * 64 // resolution**2)


def default_lanes(device_type: str, lanes: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(generator lanes, torch threads per lane), filling in whichever of the two is None.

    A GPU runs one lane with torch's threads. On a CPU the default is one lane per core with one thread
    each: OpenMP threads wait for each other at the end of every operator, so when the encoder thread takes
    a core one of G's threads stalls the other; independent single-threaded lanes do not stall
    (benchmarks/bench_synth.py measures both).
    """
    if device_type != "cpu":
        return lanes or 1, threads or torch.get_num_threads()
    cores = os.cpu_count() or 1
    if lanes is None:
        lanes = max(1, cores // threads) if threads else cores
    return lanes, threads or max(1, cores // lanes)


def decode_batches(ckpt: Any, seed: int, indices: Sequence[int], labels: Sequence[int] | None, *,
                   truncation: float = 1.0, batch_size: int = 256, lanes: int = 1, threads: int | None = None,
                   device: str | torch.device = "cpu") -> Iterator[torch.Tensor]:
    """`decode_float` of consecutive batches of `indices` (with their `labels`), yielded in order.

    Latents are drawn on their own thread, one batch ahead; `lanes` generator forwards run at once, each
    on its own thread with `threads` torch threads (see `default_lanes`). Close the iterator (or exhaust
    it) to stop the threads; the images are those `generate` gives, whatever the batch size or lanes.
    """
    truncation = check_truncation(truncation)
    starts = range(0, len(indices), batch_size)

    def batch_latents(start: int) -> torch.Tensor:  # what generate does before G, ψ included
        return latents(seed, indices[start:start + batch_size], ckpt.z_dim) * truncation

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or saved_threads)
    prefetch = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sample-latents")
    generator = cf.ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="sample-g")
    running: deque = deque()  # generator futures, oldest first
    try:
        next_z = prefetch.submit(batch_latents, 0) if len(indices) else None
        submitted = 0
        for _ in starts:
            while submitted < len(starts) and len(running) < lanes:
                start = starts[submitted]
                z = next_z.result()  # type: ignore[union-attr]
                if start + batch_size < len(indices):
                    next_z = prefetch.submit(batch_latents, start + batch_size)
                y = labels[start:start + batch_size] if labels is not None else None
                running.append(generator.submit(decode_float, ckpt, z, y, device=device))
                submitted += 1
            yield running.popleft().result()
    finally:
        for future in running:
            future.cancel()
        generator.shutdown(wait=True)
        torch.set_num_threads(saved_threads)
        prefetch.shutdown(wait=True)


def encode(ckpt: Any, images: torch.Tensor, *, device: str | torch.device = "cpu"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 N×C×H×W -> (mu, logvar), each float N×z_dim on the CPU, from the latent encoder E."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError("encode takes uint8 N×C×H×W images")
    if tuple(images.shape[1:]) != (ckpt.channels, ckpt.resolution, ckpt.resolution):
        raise UserError(f"images are {tuple(images.shape[1:])}, the checkpoint needs "
                        f"{(ckpt.channels, ckpt.resolution, ckpt.resolution)} (C, H, W)")
    with torch.inference_mode():
        mu, logvar = aligned_forward(ckpt.E, to_float(images.to(device)))
        return mu.float().cpu(), logvar.float().cpu()
