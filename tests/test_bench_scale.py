"""The folder-size benchmark: a tiny folder end to end (folder, first and warm load, fit's peak memory) and its
image generator. Times and memory are not asserted (they vary by machine); the benchmark is for measuring."""
from __future__ import annotations

import re

import numpy as np

from benchscripts import load_benchmark


def test_bench_scale_prints_its_table(tmp_path, capsys):
    bench = load_benchmark("bench_scale")
    bench.main(["--sizes", "40", "--resolution", "32", "--kimg", "0.032", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| images | PNGs MB | cache MB | first load s | first load img/s |" in out
    assert re.search(r"\| 40 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d,]+ \| \d+ \| [\d.]+ \| [\d.]+ \| \d+ \| \d+ \|", out)
    assert list(tmp_path.iterdir()) == []  # the folders and runs were removed


def test_images_are_distinct_and_seeded():
    bench = load_benchmark("bench_scale")
    a = [np.asarray(bench._image(i, 32)) for i in range(50)]
    assert len({x.tobytes() for x in a}) == 50 and a[0].shape == (32, 32, 3)
    assert np.array_equal(np.asarray(bench._image(7, 32)), a[7])
