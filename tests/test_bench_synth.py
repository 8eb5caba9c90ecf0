"""The synth throughput benchmark: a seconds-long run end to end (every table it prints), and the forward
reference with lanes. Rates are not asserted (they vary by machine); the benchmark itself is for measuring."""
from __future__ import annotations

import re

import torch

from augment_gan.checkpoint import load_checkpoint
from benchscripts import load_benchmark


def test_bench_synth_prints_every_table(tmp_path, capsys, shared_data):
    bench = load_benchmark("bench_synth")
    variants = ["synth, defaults", "synth, 1 lane x 2 threads, 1 encoder thread", "synth --format tar, defaults"]
    bench.main(["--n", "64", "--batch-size", "32", "--repeats", "1", "--resolutions", "32",
                "--out-dir", str(tmp_path), "--variants", *variants, "--tar-set", "600"])
    out = capsys.readouterr().out
    assert "| mnist 32px | whole png_files (synth's writer) |" in out
    assert re.search(r"\| sample\.latents, z_dim 128, batches of 32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out)
    assert "| whole `synth` with G replaced by a no-op, 32px 1ch, defaults |" in out
    assert "| whole `synth` with G replaced by a no-op, 32px 1ch, --format tar |" in out
    for name in [*bench.FORWARDS, *variants]:
        assert re.search(rf"\| 32px, 1ch \| {re.escape(name)} \| \d+ \(\d+-\d+\) \| \d+% ", out), name
    assert "G forward, 2 lanes x 1 thread | " in out
    assert "600 images at 32px, 1ch, 10 classes, in 1 tar shards" in out
    for what in ("write: 2 processes", "index: ", "read: every item"):
        assert re.search(rf"\| {what}.* \| [\d.]+ \| [\d,]+ \|", out), what
    assert list(tmp_path.iterdir()) == []  # everything it wrote was cleaned up


def test_forward_rate_counts_every_lane(tmp_path):
    bench = load_benchmark("bench_synth")
    ckpt = load_checkpoint(bench.random_run(tmp_path / "run", 32, 1, 10))
    saved = torch.get_num_threads()
    rate, cpu_ms = bench.forward_rate(ckpt, 64, 16, threads=1, lanes=2)
    assert rate > 0 and cpu_ms > 0
    assert torch.get_num_threads() == saved
