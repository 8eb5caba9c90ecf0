"""Synth throughput: images written per second end to end vs the pure generator forward, same run.

For each resolution (32px grayscale, 64px RGB, 10 classes) this builds the default generator from a
TrainConfig (random weights, saved and loaded through augment_gan.checkpoint: the real code path) unless
--checkpoint is given, then alternates, --repeats times:
  * forward: G_ema(z, y) on pre-made batches of --batch-size under inference_mode, n images, nothing else,
             with 1 or 2 torch threads, or as 2 lanes (2 Python threads, 1 torch thread each, own batches);
  * synth:   augment_gan.synth.synth(...) writing n PNGs (latents, G, uint8, encoding pool, atomic writes,
             manifest) with each lane/thread/encoder-pool variant, as files or (`--format tar`) tar shards.
On a shared machine wall rates swing with what else runs, so each repeat measures everything back to back
and the table gives the median of the paired ratios synth / fastest-forward-of-that-repeat. CPU ms/img is the
process CPU time (all threads) per image, far steadier under load; the last column compares it with the
cheaper forward's (1 thread: no OpenMP synchronisation).

    python benchmarks/bench_synth.py                       # 10,000 images at 32 and 64px (~15 min on 2 cores)
    python benchmarks/bench_synth.py --out-dir /dev/shm    # the same, files on tmpfs (no disk in the loop)
    python benchmarks/bench_synth.py --n 1000 --repeats 1  # quick look
    python benchmarks/bench_synth.py --codecs-only          # only the PNG compressor table (seconds)
    python benchmarks/bench_synth.py --resolutions 32 --variants "synth, defaults" "synth --format tar, defaults" \
        --tar-set 1000000                                  # files vs tar on the temp dir's disk, then 1M in tar

`--tar-set N` finally writes N images at 32 px as tar shards with two processes (`synth --format tar --shard
K/2 --lanes 1 --threads 1`, side by side), reads them all back through `SyntheticTarDataset` (a DataLoader
with 2 workers) and prints both rates; 1,000,000 images take about 3.5 GB and 10-15 minutes on 2 cores.

First it prints a table of PNG deflate compressors on real images (../shared/data: MNIST at 32px, emoji at
64px): CPU microseconds per image and mean file size, for the compressor synth uses and the alternatives.
Then a table of synth's own work besides G (latents, one atomic file write on --out-dir's file system, and a
whole synth run with G replaced by a no-op, as files and as tar shards), three rounds each, so the file
system's variance shows.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from augment_gan.checkpoint import load_checkpoint, save_checkpoint
from augment_gan.runmeta import RunMeta
from augment_gan.config import TrainConfig
from augment_gan.models import build_networks
from augment_gan.data import ReadOptions, load_folder
from augment_gan import sample
from augment_gan.atomic import write_atomic
from augment_gan.imagefile import PNG_COMPRESSOR, png_files, png_scanlines
from augment_gan.synth import SynthConfig, synth

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the repo
CODEC_DATA = (("mnist", 32), ("emoji-twitter", 64))

VARIANTS = {  # name -> (encoder pool, encoders, torch threads per lane, lanes, format; None = synth's defaults)
    "synth, defaults": (None, None, None, None, "png"),
    "synth, 1 lane x 2 threads, 1 encoder thread": ("thread", 1, 2, 1, "png"),
    "synth, 1 lane x 1 thread, 1 encoder thread": ("thread", 1, 1, 1, "png"),
    "synth, 2 lanes x 1 thread, 2 encoder threads": ("thread", 2, 1, 2, "png"),
    "synth, 1 lane x 2 threads, 1 encoder process": ("process", 1, 2, 1, "png"),
    "synth --format tar, defaults": (None, None, None, None, "tar"),
}
FORWARDS = {  # name -> (torch threads per lane, lanes)
    "G forward, 1 lane x 1 thread": (1, 1),
    "G forward, 1 lane x 2 threads": (2, 1),
    "G forward, 2 lanes x 1 thread": (1, 2),
}


def codecs() -> dict:
    """name -> compress(bytes) for every deflate compressor importable here."""
    found = {"zlib level 1": lambda b: zlib.compress(b, 1), "zlib level 6 (Pillow's default)": lambda b: zlib.compress(b, 6),
             "zlib level 0 (stored, no compression)": lambda b: zlib.compress(b, 0)}
    try:
        from isal import isal_zlib
    except ImportError:
        return found
    found.update({"isal level 0": lambda b: isal_zlib.compress(b, 0), "isal level 1": lambda b: isal_zlib.compress(b, 1)})
    return found


def codec_table(cache: Path, n: int = 1000, repeats: int = 3) -> None:
    """CPU time and size of each compressor on the scanlines png_files deflates, real images."""
    print(f"PNG deflate on {n} real images each, best of {repeats}; synth uses: {PNG_COMPRESSOR}\n")
    print("| images | compressor | CPU us/img | mean file bytes | x zlib-1 size |")
    print("|---|---|---:|---:|---:|")
    for name, res in CODEC_DATA:
        folder = SHARED_DATA / name
        if not folder.is_dir():
            print(f"| {name} | (folder {folder} not found) | | | |")
            continue
        images = np.ascontiguousarray(load_folder(folder, ReadOptions(resolution=res), cache_dir=cache,
                                                  progress=False).images[:n])
        k = len(images)
        lines = [bytes(r) for r in png_scanlines(images)]  # exactly what png_files deflates
        sizes = {}
        for codec, compress in codecs().items():
            best = math.inf
            for _ in range(repeats):
                t = time.process_time()
                out = [compress(b) for b in lines]
                best = min(best, time.process_time() - t)
            assert zlib.decompress(out[0]) == lines[0]
            sizes[codec] = float(np.mean([len(o) for o in out]))
            ref = sizes.get("zlib level 1", sizes[codec])
            print(f"| {name} {res}px | {codec} | {best / k * 1e6:.1f} | {sizes[codec]:.0f} | {sizes[codec] / ref:.2f} |")
        t = time.process_time()
        files = png_files(images)
        print(f"| {name} {res}px | whole png_files (synth's writer) | {(time.process_time() - t) / k * 1e6:.1f} "
              f"| {np.mean([len(f) for f in files]):.0f} | |")
    print()


def own_work_table(out_dir: Path, resolutions: list[int], n: int, batch: int, work: Path) -> None:
    """What synth costs besides G: per-index latents, per-file atomic writes on --out-dir's file system
    (three rounds, to show its variance), and a whole `synth` run with G replaced by a no-op."""
    print("synth's own work (CPU us per image; G excluded)\n")
    print("| what | round 1 | round 2 | round 3 |")
    print("|---|---:|---:|---:|")
    cells = []
    for _ in range(3):
        t = time.process_time()
        for start in range(0, n, batch):
            sample.latents(0, range(start, start + batch), 128)
        cells.append(f"{(time.process_time() - t) / n * 1e6:.1f}")
    print(f"| sample.latents, z_dim 128, batches of {batch} | " + " | ".join(cells) + " |")
    cells = []
    folder = Path(tempfile.mkdtemp(prefix="bench-synth-io-", dir=out_dir))
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for r in range(3):
            t = time.process_time()
            for i in range(n):
                write_atomic(f"{r}-{i}.png", b"\x89PNG" + bytes(300), dir_fd=fd)
            cells.append(f"{(time.process_time() - t) / n * 1e6:.1f}")
    finally:
        os.close(fd)
    print(f"| write_atomic of a 304-byte file (temp + rename) on {out_dir} | " + " | ".join(cells) + " |")
    for res in resolutions:
        ckpt = load_checkpoint(random_run(work / f"noop{res}", res, 1 if res == 32 else 3, 10))
        fixed = torch.rand(batch, ckpt.channels, res, res) * 2 - 1

        class NoOp(torch.nn.Module):
            def forward(self, z, y=None):
                return fixed[: z.shape[0]].clone()

        ckpt.G_ema = NoOp()
        for fmt in ("png", "tar"):
            cells = []
            for r in range(3):
                cpu = cpu_seconds()
                synth(ckpt, folder / f"noop-{res}-{fmt}-{r}", SynthConfig(n=n, batch_size=batch, format=fmt, progress=False))
                cells.append(f"{(cpu_seconds() - cpu) / n * 1e6:.1f}")
            what = "defaults" if fmt == "png" else "--format tar"
            print(f"| whole `synth` with G replaced by a no-op, {res}px {ckpt.channels}ch, {what} | "
                  + " | ".join(cells) + " |")
    print()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # encoder processes, once they have exited
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


def random_run(folder: Path, resolution: int, channels: int, classes: int) -> Path:
    """A checkpoint of the default architecture with random weights, written by the checkpoint module."""
    config = TrainConfig(resolution=resolution)
    torch.manual_seed(0)
    g, d, e = build_networks(config, channels, classes)
    meta = RunMeta(config=config, conditional=classes > 0, classes=tuple(str(c) for c in range(classes)),
                   channels=channels)
    g_ema = build_networks(config, channels, classes)[0]
    g_ema.load_state_dict(g.state_dict())
    save_checkpoint(folder, {"G": g, "G_ema": g_ema, "D": d, "E": e}, {}, {}, meta)
    return folder


def forward_rate(ckpt, n: int, batch: int, threads: int, lanes: int) -> tuple[float, float]:
    """G_ema alone on pre-made batches: `lanes` Python threads at once, each with its own batch."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    z = torch.randn(batch, ckpt.z_dim)
    y = torch.arange(batch) % ckpt.num_classes if ckpt.num_classes else None
    per_lane = math.ceil(n / batch / lanes)

    def lane() -> None:
        with torch.inference_mode():
            for _ in range(per_lane):
                ckpt.G_ema(z, y)

    try:
        with torch.inference_mode():
            ckpt.G_ema(z, y)  # warm-up
        start, cpu = time.perf_counter(), cpu_seconds()
        with cf.ThreadPoolExecutor(lanes) as pool:
            for future in [pool.submit(lane) for _ in range(lanes)]:
                future.result()
        done = per_lane * lanes * batch
        return done / (time.perf_counter() - start), (cpu_seconds() - cpu) / done * 1e3
    finally:
        torch.set_num_threads(saved)


def synth_rate(ckpt, n: int, batch: int, out: Path, pool: str | None, workers: int | None,
               threads: int | None, lanes: int | None, fmt: str = "png") -> tuple[float, float]:
    start, cpu = time.perf_counter(), cpu_seconds()
    summary = synth(ckpt, out, SynthConfig(n=n, batch_size=batch, workers=workers, threads=threads, lanes=lanes,
                                           pool=pool or "thread", format=fmt, progress=False))
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    assert summary.written == n and summary.manifest, summary
    return n / wall, cpu / n * 1e3


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


def tar_set_table(n: int, out_dir: Path | None, forward: tuple[float, float] | None) -> None:
    """Write n images at 32 px as tar shards with two `synth --shard K/2` processes side by side, then read
    every one back through SyntheticTarDataset; print both rates. `forward`: the fastest G forward measured
    at 32 px in this run (images/s) and the least forward CPU (ms per image), for the ratios."""
    from torch.utils.data import DataLoader

    from augment_gan.datasets import SyntheticTarDataset

    work = Path(tempfile.mkdtemp(prefix="bench-synth-tarset-", dir=out_dir))
    try:
        run = random_run(work / "run", 32, 1, 10)
        out = work / "set"
        cmds = [[sys.executable, "-m", "augment_gan", "synth", str(run), "--n", str(n), "--out", str(out),
                 "--format", "tar", "--shard", f"{k}/2", "--lanes", "1", "--threads", "1", "--device", "cpu",
                 "--quiet", "--json"] for k in range(2)]
        start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
        results = [p.communicate() for p in procs]
        write_s = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        write_cpu_ms = (after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime) / n * 1e3
        for p, (stdout, stderr) in zip(procs, results):
            if p.returncode != 0:
                raise RuntimeError(f"synth failed ({p.returncode}): {stderr[-2000:]}")
        summaries = [json.loads(stdout) for stdout, _ in results]
        assert sum(x["written"] for x in summaries) == n and any(x["manifest"] for x in summaries), summaries
        shards = sorted(out.glob("shard-*.tar"))
        size = sum(p.stat().st_size for p in shards)

        start = time.perf_counter()
        dataset = SyntheticTarDataset(out, transform=_to_tensor, mode=None)
        index_s = time.perf_counter() - start
        start = time.perf_counter()
        count = 0
        for x, y in DataLoader(dataset, batch_size=256, num_workers=2):
            count += len(x)
        read_s = time.perf_counter() - start
        assert count == n
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = (f"{n / write_s / forward[0]:.0%} of the fastest 32px G forward above in images/s, "
             f"{forward[1] / write_cpu_ms:.0%} in CPU per image") if forward else "no forward measured"
    print(f"\n{n:,} images at 32px, 1ch, 10 classes, in {len(shards)} tar shards ({size / 1e9:.2f} GB) on "
          f"{out_dir or tempfile.gettempdir()}\n")
    print("| what | seconds | images/s |")
    print("|---|---:|---:|")
    print(f"| write: 2 processes `synth --format tar --shard K/2 --lanes 1 --threads 1` side by side, "
          f"{write_cpu_ms:.2f} CPU ms/img ({ratio}) | {write_s:.1f} | {n / write_s:,.0f} |")
    print(f"| index: `SyntheticTarDataset(out)` (scan every shard's headers) | {index_s:.1f} | {n / index_s:,.0f} |")
    print(f"| read: every item, in order, DataLoader 2 workers, batch 256 (PNG decode + tensor) | {read_s:.1f} "
          f"| {n / read_s:,.0f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a run or checkpoint instead of random weights")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="folder whose file system receives the images (default: the temp dir; try /dev/shm)")
    parser.add_argument("--codecs-only", action="store_true", help="print the PNG compressor table and stop")
    parser.add_argument("--tar-set", type=int, default=0, metavar="N",
                        help="then write N images at 32px as tar shards with 2 processes and read them back")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-synth-cache-") as cache:
        codec_table(Path(cache))
    if args.codecs_only:
        return
    work = Path(tempfile.mkdtemp(prefix="bench-synth-"))
    # Every measurement writes a fresh folder and all are deleted at the end: deleting 10,000 files right
    # before a measurement would make it pay for the file system's clean-up (discard) too.
    out_dir = Path(tempfile.mkdtemp(prefix="bench-synth-out-", dir=args.out_dir))
    rows = []
    forward32 = None
    load_start = os.getloadavg()
    try:
        own_work_table(out_dir, args.resolutions, args.n, args.batch_size, work)
        for res in args.resolutions:
            if args.checkpoint is not None:
                ckpt = load_checkpoint(args.checkpoint)
            else:
                ckpt = load_checkpoint(random_run(work / f"run{res}", res, 1 if res == 32 else 3, 10))
            res = ckpt.resolution
            results: dict[str, list[tuple[float, float]]] = {f: [] for f in FORWARDS}
            results.update({v: [] for v in args.variants})
            for rep in range(args.repeats):
                # One repeat measures everything back to back, so a paired ratio sees the same machine load.
                for f, (threads, lanes) in FORWARDS.items():
                    results[f].append(forward_rate(ckpt, args.n, args.batch_size, threads, lanes))
                for v in args.variants:
                    out = out_dir / f"{res}-{rep}-{list(VARIANTS).index(v)}"
                    results[v].append(synth_rate(ckpt, args.n, args.batch_size, out, *VARIANTS[v]))
                print(f"{res}px repeat {rep + 1}: " + ", ".join(f"{k} {r[-1][0]:.0f} img/s" for k, r in results.items()),
                      file=sys.stderr, flush=True)
            # Reference: in each repeat, the fastest G forward (what a user gets without writing anything).
            best = [max(results[f][rep][0] for f in FORWARDS) for rep in range(args.repeats)]
            fwd_cpu = min(statistics.median(c for _, c in results[f]) for f in FORWARDS)
            if res == 32:
                forward32 = statistics.median(best), fwd_cpu
            for name, runs in results.items():
                ratios = sorted(r / b for (r, _), b in zip(runs, best))
                rates = [r for r, _ in runs]
                rows.append((f"{res}px, {ckpt.channels}ch", name, statistics.median(rates), min(rates), max(rates),
                             statistics.median(ratios), ratios[0], ratios[-1],
                             statistics.median(c for _, c in runs), fwd_cpu))
            if args.checkpoint is not None:
                break
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    load_end = os.getloadavg()

    print(f"\n{args.n:,} images per measurement, batch {args.batch_size}, median of {args.repeats}, "
          f"{os.cpu_count()} CPUs, images written to {out_dir}, load average "
          f"{load_start[0]:.1f} -> {load_end[0]:.1f}; % of the fastest G forward\n")
    print("| resolution | what | images/s median (min-max) | % of G forward, paired (min-max) "
          "| CPU ms/img | least forward CPU / this |")
    print("|---|---|---:|---:|---:|---:|")
    for res, name, rate, lo, hi, ratio, rlo, rhi, cpu, fwd_cpu in rows:
        print(f"| {res} | {name} | {rate:.0f} ({lo:.0f}-{hi:.0f}) | {ratio:.0%} ({rlo:.0%}-{rhi:.0%}) "
              f"| {cpu:.2f} | {fwd_cpu / cpu:.0%} |")
    if args.tar_set:
        tar_set_table(args.tar_set, args.out_dir, forward32)


if __name__ == "__main__":
    main()
