"""Folder size vs time and memory: first load, warm load and the peak memory of a short `fit`.

For each size N (default 2,000, 20,000 and 100,000) this writes N distinct 64 px PNGs in 10 class folders
on a real disk (random shapes over a gradient with mild noise, seeded; the smaller folders are hard links to
the first files of the largest), then, each in a fresh child process:
  * first load: `load_folder` into an empty cache (scan, decode in the worker pool, stream into the cache);
  * warm load:  `load_folder` again (a cache hit: scan, sidecar, memory map);
  * fit:        `augment-gan fit FOLDER --kimg 0.1 --resolution 64 --device cpu` on that warm cache.
Peak RSS is the child's `ru_maxrss` from wait4 (the largest of the child and its decode workers; it counts
resident file-backed pages too, e.g. touched pages of the memory-mapped cache); peak anonymous memory is the
child's own RssAnon from /proc, sampled every 20 ms (Linux only).

    python benchmarks/bench_scale.py                                  # 2k / 20k / 100k (~5 min on 2 cores, ~2 GB disk)
    python benchmarks/bench_scale.py --sizes 2000 20000               # quicker
    python benchmarks/bench_scale.py --work /mnt/disk --keep          # folders elsewhere, kept for reruns

Target (the issue): fit's peak RSS at 100,000 images <= 1.3x that at 2,000; first decode >= 1,500 images/s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = 10


def _image(index: int, size: int) -> Image.Image:
    """Image `index`: a seeded gradient, shapes and noise, with the index written into its first row
    (so no two are equal)."""
    rng = np.random.default_rng(index)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    base = (a * (1 - t) + b * t).repeat(size, axis=1)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):
        x0, y0 = rng.integers(0, size - 8, 2)
        x1, y1 = x0 + rng.integers(6, size // 2), y0 + rng.integers(6, size // 2)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((int(x0), int(y0), int(x1), int(y1)), fill=fill)
    row = np.asarray(image).copy()
    bits = [(index >> k) & 1 for k in range(32)]
    row[0, :32] = np.array(bits, np.uint8)[:, None] * 255
    return Image.fromarray(row, "RGB")


def _name(index: int) -> str:
    return f"{index % CLASSES}/{index:07d}.png"


def _write_range(folder: str, start: int, stop: int, size: int) -> None:
    for i in range(start, stop):
        _image(i, size).save(os.path.join(folder, _name(i)), compress_level=1)


def make_folders(work: Path, sizes: list[int], size: int, workers: int) -> dict[int, Path]:
    """Folders of each size; the largest is written, the others hard-link its first files."""
    largest = max(sizes)
    full = work / f"images-{largest}"
    if not (full / ".complete").exists():
        shutil.rmtree(full, ignore_errors=True)
        for c in range(CLASSES):
            (full / str(c)).mkdir(parents=True)
        # One child process per core, each writing its slice (children import this file by path, which
        # works however it was loaded).
        step = -(-largest // workers)
        procs = [subprocess.Popen([sys.executable, __file__, "--child-write", str(full), str(s),
                                   str(min(s + step, largest)), str(size)]) for s in range(0, largest, step)]
        if any(p.wait() for p in procs):
            raise RuntimeError("writing the image folder failed")
        (full / ".complete").touch()
    folders = {largest: full}
    for n in sizes:
        if n == largest:
            continue
        folder = work / f"images-{n}"
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            for c in range(CLASSES):
                (folder / str(c)).mkdir(parents=True)
            for i in range(n):
                os.link(full / _name(i), folder / _name(i))
            (folder / ".complete").touch()
        folders[n] = folder
    return folders


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], log: Path) -> dict:
    """Run `cmd` to the end -> wall seconds, peak RSS (MB, wait4) and sampled peak anonymous memory (MB)."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _rss_anon_kb(proc.pid))
            time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    return {"wall": wall, "maxrss_mb": usage.ru_maxrss / 1024, "anon_mb": anon / 1024, "log": log.read_text()}


def child_load(folder: str, cache: str, resolution: int) -> None:
    """In a child process: time one load_folder and print the result as JSON."""
    from augment_gan.data import ReadOptions, load_folder

    start = time.perf_counter()
    images = load_folder(folder, ReadOptions(resolution=resolution), cache_dir=cache, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "images": len(images), "from_cache": images.from_cache,
                      "shape": list(images.images.shape)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000, 100_000])
    parser.add_argument("--resolution", type=int, default=64, help="image size on disk and for fit")
    parser.add_argument("--kimg", type=float, default=0.1, help="fit's budget")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder on the disk to measure (default: the temp dir); needs ~20 KB per image")
    parser.add_argument("--keep", action="store_true", help="keep the image folders for another run")
    parser.add_argument("--child-load", nargs=2, metavar=("FOLDER", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-write", nargs=4, metavar=("FOLDER", "START", "STOP", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_load:
        child_load(*args.child_load, args.resolution)
        return
    if args.child_write:
        folder, start, stop, size = args.child_write
        _write_range(folder, int(start), int(stop), int(size))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work)) if not args.keep else \
        (args.work or Path(tempfile.gettempdir())) / "bench-scale-images"
    work.mkdir(parents=True, exist_ok=True)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    load_start = os.getloadavg()
    try:
        t = time.perf_counter()
        folders = make_folders(work, sorted(set(args.sizes)), args.resolution, cpus)
        print(f"folders ready in {time.perf_counter() - t:.0f} s under {work}", file=sys.stderr, flush=True)
        for n in sorted(set(args.sizes)):
            runs = Path(tempfile.mkdtemp(prefix=f"runs-{n}-", dir=work))
            cache = runs / "cache"
            load = [sys.executable, __file__, "--resolution", str(args.resolution),
                    "--child-load", str(folders[n]), str(cache)]
            first = measure(load, runs / "first.log")
            first_out = json.loads(first["log"].strip().splitlines()[-1])
            assert not first_out["from_cache"] and first_out["images"] == n, first_out
            warm = measure(load, runs / "warm.log")
            warm_out = json.loads(warm["log"].strip().splitlines()[-1])
            assert warm_out["from_cache"], warm_out
            fit = measure([sys.executable, "-m", "augment_gan", "fit", str(folders[n]), "--out", str(runs / "run"),
                           "--kimg", str(args.kimg), "--resolution", str(args.resolution), "--device", "cpu",
                           "--cache-dir", str(cache), "--quiet"], runs / "fit.log")
            assert list((runs / "run" / "checkpoints").glob("*.safetensors")), fit["log"][-2000:]
            disk = sum(f.stat().st_size for f in folders[n].rglob("*.png")) / 1e6
            npy = sum(f.stat().st_size for f in cache.glob("*.npy")) / 1e6
            rows.append((n, disk, npy, first_out["seconds"], n / first_out["seconds"], first["maxrss_mb"],
                         warm_out["seconds"], fit["wall"], fit["maxrss_mb"], fit["anon_mb"]))
            print(f"{n}: first {first_out['seconds']:.1f} s, warm {warm_out['seconds']:.2f} s, "
                  f"fit peak RSS {fit['maxrss_mb']:.0f} MB", file=sys.stderr, flush=True)
            shutil.rmtree(runs, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()

    print(f"\n{args.resolution} px RGB PNGs in {CLASSES} class folders, {cpus} CPUs, load average "
          f"{load_start[0]:.1f} -> {load_end[0]:.1f}; each row's loads and fit in fresh processes; fit --kimg "
          f"{args.kimg} --resolution {args.resolution} on the warm cache\n")
    print("| images | PNGs MB | cache MB | first load s | first load img/s | first load peak RSS MB "
          "| warm load s | fit wall s | fit peak RSS MB | fit peak anon MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, disk, npy, first_s, rate, first_rss, warm_s, fit_s, rss, anon in rows:
        print(f"| {n:,} | {disk:.0f} | {npy:.0f} | {first_s:.1f} | {rate:,.0f} | {first_rss:.0f} | {warm_s:.2f} "
              f"| {fit_s:.1f} | {rss:.0f} | {anon:.0f} |")
    if len(rows) > 1:
        print(f"\nfit peak RSS, largest / smallest folder: {rows[-1][8] / rows[0][8]:.2f}x "
              f"(anonymous: {rows[-1][9] / rows[0][9]:.2f}x)")


if __name__ == "__main__":
    main()
