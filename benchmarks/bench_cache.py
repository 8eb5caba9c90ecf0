"""Cold decode vs warm cache load of an image folder (default: emoji-twitter at 64 px), in one run.

    python benchmarks/bench_cache.py [--folder DIR] [--resolution 64] [--repeats 3]

Each cold run decodes into a fresh, empty temporary cache directory; each warm run loads the entry
the last cold run wrote. Prints a markdown table of median wall-clock times and the speed-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from augment_gan.data import ReadOptions, load_folder

DEFAULT_FOLDER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "emoji-twitter"


def _time(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    options = ReadOptions(resolution=args.resolution)

    rows: dict[str, list[float]] = {"cold, 1 process": [], "cold, worker pool": [], "warm (memmap)": [],
                                    "warm + read every pixel": []}
    n = channels = 0
    workers = None
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            cache = Path(tmp) / f"cache-{repeat}"
            seconds, _ = _time(lambda: load_folder(args.folder, options, cache_dir=Path(tmp) / f"single-{repeat}",
                                                   workers=1, progress=False))
            rows["cold, 1 process"].append(seconds)
            seconds, cold = _time(lambda: load_folder(args.folder, options, cache_dir=cache, progress=False))
            rows["cold, worker pool"].append(seconds)
            assert not cold.from_cache
            seconds, warm = _time(lambda: load_folder(args.folder, options, cache_dir=cache, progress=False))
            rows["warm (memmap)"].append(seconds)
            assert warm.from_cache and np.array_equal(np.asarray(warm.images), cold.images)
            # A memmap defers reading; summing forces every page in (from the OS page cache here).
            seconds, _ = _time(lambda: int(load_folder(args.folder, options, cache_dir=cache,
                                                       progress=False).images.sum(dtype=np.int64)))
            rows["warm + read every pixel"].append(seconds)
            n, channels = len(cold), cold.channels
    try:
        workers = len(os.sched_getaffinity(0))
    except AttributeError:
        workers = os.cpu_count()

    reference = statistics.median(rows["cold, worker pool"])
    print(f"{args.folder.name}: {n} images at {args.resolution}px, {channels} channels; "
          f"median of {args.repeats}; {workers} CPUs; Python {sys.version.split()[0]}\n")
    print("| load | seconds | speed-up vs cold (pool) |")
    print("|---|---:|---:|")
    for name, times in rows.items():
        median = statistics.median(times)
        print(f"| {name} | {median:.3f} | {reference / median:.1f}× |")


if __name__ == "__main__":
    main()
