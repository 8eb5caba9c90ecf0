"""`augment-gan synth`: determinism, shards, resume, overwrite rules, labels, manifest and filters."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from augment_gan import sample
from augment_gan import imagefile
from augment_gan.checkpoint import load_checkpoint
from augment_gan.cli import app
from augment_gan.config import TrainConfig
from augment_gan.errors import UserError
from augment_gan.plan import GROUP_SIZE, make_plan, select
from augment_gan.sample import default_lanes
from augment_gan.synth import SynthConfig, synth

pytest_plugins = ["fixtures_run"]  # tiny_run, uncond_run, digits100 (session-scoped, shared with test_sample)


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return load_checkpoint(tiny_run)


def config(**options) -> SynthConfig:
    return SynthConfig(progress=False, **{"n": 60, **options})


def snapshot(root: Path, skip_shard_manifests: bool = True) -> dict[str, bytes]:
    """Every file under root by relative path (shard manifests and hidden lock files are per-run bookkeeping)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
            and not (skip_shard_manifests and p.name.startswith("manifest.shard-"))}


def manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def images(root: Path) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(root).items() if k.endswith(".png")}


# ----------------------------------------------------------------------------------------------------
# The plan and the selection rule (pure functions).

@pytest.mark.parametrize("n,keep_top", [(25, None), (600, None), (37, 0.3), (700, 0.25), (10, 1.0)])
def test_plan_covers_every_index_once(n, keep_top):
    plan = make_plan([str(c) for c in range(4)], 4, n=n, keep_top=keep_top)
    finals = [i for u in plan.units for i in u.finals]
    assert sorted(finals) == list(range(n))
    candidates = [c for u in plan.units for c in u.candidates]
    assert len(set(candidates)) == len(candidates)                    # no latent is used twice
    for c, count in enumerate(plan.counts):
        units = [u for u in plan.units if u.class_pos == c]
        assert all(plan.label_of(i) == c and i % 4 == c for u in units for i in u.finals)
        assert all(c_ % 4 == c for u in units for c_ in u.candidates)  # candidates share the class's plan
        assert sum(len(u.candidates) for u in units) == math.ceil(count / (keep_top or 1) - 1e-9)
        assert all(len(u.finals) <= GROUP_SIZE for u in units)
    assert plan.counts == tuple(n // 4 + (c < n % 4) for c in range(4))
    if keep_top in (None, 1.0):
        assert all(u.candidates == u.finals for u in plan.units)


def test_plan_options_and_class_names():
    plan = make_plan(["cat", "dog", "eel"], 3, per_class=4, classes=("eel", "cat"))
    assert plan.n == 8 and plan.classes == ("eel", "cat") and plan.labels == (2, 0)
    assert plan.relpath(plan.units[1], 3) == "cat/000003.png"
    with pytest.raises(UserError, match="unknown classes"):
        make_plan(["cat"], 1, n=3, classes=("cow",))
    with pytest.raises(UserError, match="unconditional"):
        make_plan([], 0, per_class=3)
    for bad in ("../evil", "a/b", "..", "", "x\\y"):
        with pytest.raises(UserError):
            make_plan(["ok", bad], 2, n=4)


def test_select_keeps_best_and_primaries_keep_their_index():
    unit = make_plan(["a", "b"], 2, n=8, keep_top=0.5).units[0]       # class a: finals 0,2,4,6
    assert unit.finals == (0, 2, 4, 6) and unit.candidates == (0, 2, 4, 6, 8, 10, 12, 14)
    scores = {0: 5.0, 2: -1.0, 4: 3.0, 6: -2.0, 8: 4.0, 10: float("nan"), 12: 0.0, 14: 9.0}
    assign, rejected = select(unit, scores, set(), 0.5)
    assert assign == {0: 0, 4: 4, 8: 2, 14: 6}                         # survivors 0, 4 stay; 8, 14 fill 2, 6
    assert rejected == {2: "keep-top", 6: "keep-top", 10: "keep-top", 12: "keep-top"}
    assign, rejected = select(unit, scores, {0, 14}, 0.5)               # dedup drops go first
    assert assign == {2: 2, 4: 4, 8: 0, 12: 6}
    assert rejected[0] == rejected[14] == "dedup"
    plain = make_plan(["a", "b"], 2, n=8).units[0]
    assign, rejected = select(plain, None, {2}, None)                   # dedup alone leaves a gap
    assert assign == {0: 0, 4: 4, 6: 6} and rejected == {2: "dedup"}


def test_png_writer_round_trips_real_images(shared_data):
    import io

    from augment_gan.data import ReadOptions, load_folder

    for name, channels in (("mnist", "gray"), ("emoji-twitter", "rgb")):
        subset = load_folder(shared_data / name / ("3" if name == "mnist" else "flags"),
                             ReadOptions(resolution=32, channels=channels), progress=False, use_cache=False)
        images = np.ascontiguousarray(subset.images[:8])
        for array, data in zip(images, imagefile.png_files(images)):
            decoded = np.asarray(Image.open(io.BytesIO(data)))
            assert np.array_equal(decoded.reshape(array.shape), array)
            assert Image.open(io.BytesIO(data)).mode == ("L" if channels == "gray" else "RGB")
    with pytest.raises(ValueError):
        imagefile.png_files(np.zeros((1, 4, 4, 2), np.uint8))


# ----------------------------------------------------------------------------------------------------
# Determinism, layout, manifest.

def test_same_bytes_twice_and_layout(ckpt, tmp_path):
    a = synth(ckpt, tmp_path / "a", config(lanes=1, threads=1))
    b = synth(ckpt, tmp_path / "b", config(batch_size=7, workers=3, lanes=3))  # 3 generator threads at once
    assert a.written == b.written == a.images == 60 and a.manifest
    assert (a.lanes, b.lanes, b.threads) == (1, 3, 1)
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    rows = manifest(tmp_path / "a")
    assert [r["index"] for r in rows] == list(range(60))
    for r in rows:
        assert r["class"] == ckpt.classes[r["label"]] == ckpt.classes[r["index"] % 10]
        assert r["file"] == f"{r['class']}/{r['index']:06d}.png" and r["kept"] and r["filter"] is None
        assert r["seed"] == 0 and r["checkpoint"] == ckpt.digest and r["latent"] == r["index"]
    for c in ckpt.classes:                                            # balanced
        assert len(list((tmp_path / "a" / c).glob("*.png"))) == 6
    # The file holds exactly what the sampling API generates for that index.
    expected = sample.generate(ckpt, [13], seed=0)[0, 0].numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "3" / "000013.png")), expected)
    info = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert info["checkpoint"]["digest"] == ckpt.digest and info["classes"] == ckpt.classes
    assert info["n"] == 60 and info["seed"] == 0 and info["format"] == "png"
    # A rerun with the same settings is a resume with nothing to do.
    again = synth(ckpt, tmp_path / "a", config(batch_size=16))
    assert again.written == 0 and again.existing == 60
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b")
    other = synth(ckpt, tmp_path / "c", config(seed=1))
    assert images(tmp_path / "c") != images(tmp_path / "a") and other.images == 60


def test_default_lanes(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert default_lanes("cpu") == (8, 1)              # one single-threaded G per core
    assert default_lanes("cpu", threads=2) == (4, 2)
    assert default_lanes("cpu", lanes=2) == (2, 4)
    assert default_lanes("cpu", lanes=3, threads=3) == (3, 3)
    assert default_lanes("cuda") == (1, torch.get_num_threads())
    with pytest.raises(UserError, match="--lanes"):
        config(lanes=0)


def test_other_formats_and_truncation(ckpt, tmp_path):
    s = synth(ckpt, tmp_path / "jpg", config(n=12, format="jpg", quality=80, truncation=0.5))
    assert s.images == 12 and len(list((tmp_path / "jpg").rglob("*.jpg"))) == 12
    assert {r["truncation"] for r in manifest(tmp_path / "jpg")} == {0.5}
    synth(ckpt, tmp_path / "webp", config(n=12, format="webp"))
    assert Image.open(tmp_path / "webp" / "0" / "000000.webp").size == (32, 32)


def test_shards_add_up_to_single_run(ckpt, tmp_path, monkeypatch):
    single = synth(ckpt, tmp_path / "one", config(n=70))
    assert single.manifest
    out = tmp_path / "sharded"
    first = synth(ckpt, out, config(n=70, shard=(0, 3), batch_size=5))
    assert first.manifest is None and not (out / "manifest.jsonl").exists()
    assert first.shard_manifest and Path(first.shard_manifest).name == "manifest.shard-0-of-3.jsonl"
    synth(ckpt, out, config(n=70, shard=(2, 3), batch_size=9, workers=2))
    monkeypatch.setenv("RANK", "1")                                   # the last shard as torchrun would run it
    monkeypatch.setenv("WORLD_SIZE", "3")
    last = synth(ckpt, out, config(n=70))
    assert last.shard == (1, 3) and last.manifest == str(out / "manifest.jsonl")
    assert snapshot(out) == snapshot(tmp_path / "one")               # same files, bytes and merged manifest


# ----------------------------------------------------------------------------------------------------
# Resume and safety.

@pytest.mark.parametrize("filters", [{}, {"keep_top": 0.5}])
def test_resume_after_a_crash(ckpt, tmp_path, monkeypatch, filters):
    reference = tmp_path / "ref"
    synth(ckpt, reference, config(**filters))
    out = tmp_path / "out"
    real_write = imagefile._write_chunk
    calls = []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real_write(*args)

    monkeypatch.setattr(imagefile, "_write_chunk", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synth(ckpt, out, config(batch_size=8, workers=1, **filters))
    monkeypatch.setattr(imagefile, "_write_chunk", real_write)
    done = sorted(out.rglob("*.png"))
    assert 0 < len(done) < 60 and not (out / "manifest.jsonl").exists()
    # What a kill leaves at worst: a half-written image and a stale temporary file.
    done[0].write_bytes(done[0].read_bytes()[:40])
    (out / "5" / "000005.png.tmp-999999").write_bytes(b"partial")
    resumed = synth(ckpt, out, config(batch_size=32, **filters))
    assert resumed.images == 60 and resumed.written + resumed.existing == 60
    assert not list(out.rglob("*.tmp-*"))
    assert snapshot(out) == snapshot(reference)


def test_resume_after_sigkill(tiny_run, ckpt, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "augment_gan", "synth", str(tiny_run), "--n", "1000", "--out", str(out),
           "--batch-size", "1", "--workers", "1", "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and sum(1 for _ in out.rglob("*.png")) >= 50:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written_before = sum(1 for _ in out.rglob("*.png"))
    assert 50 <= written_before < 1000
    summary = synth(ckpt, out, config(n=1000, batch_size=256))
    assert summary.existing >= written_before - 4 and summary.images == 1000
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 1000 and not list(out.rglob("*.tmp-*"))
    assert all(imagefile.readable_image(p, 32) for p in pngs)
    assert len(manifest(out)) == 1000
    # Files written before and after the kill hold what the sampling API generates for their index.
    for i in (0, 1, 17, 500, 999):
        expected = sample.generate(ckpt, [i], seed=0)[0, 0].numpy()
        assert np.array_equal(np.asarray(Image.open(out / str(i % 10) / f"{i:06d}.png")), expected)


def test_no_overwrite_without_the_flag(ckpt, tmp_path):
    out = tmp_path / "set"
    synth(ckpt, out, config(n=20))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="other settings.*seed 0 -> 1"):
        synth(ckpt, out, config(n=20, seed=1))
    with pytest.raises(UserError, match="other settings"):
        synth(ckpt, out, config(n=20, keep_top=0.5))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(UserError, match="not empty"):
        synth(ckpt, foreign, config(n=5))
    assert (foreign / "holiday.jpg").read_bytes() == b"not ours"
    # --overwrite replaces the old set (only the files synth wrote) with the new one.
    s = synth(ckpt, out, config(per_class=5, n=None, classes=("3",), overwrite=True))
    assert s.images == 5 and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == \
        [f"3/{i:06d}.png" for i in range(5)]
    assert not (out / "0").exists() and [r["class"] for r in manifest(out)] == ["3"] * 5
    synth(ckpt, tmp_path / "fresh", config(per_class=5, n=None, classes=("3",)))
    assert images(out) == images(tmp_path / "fresh")


def test_labels_follow_the_checkpoint_classes(ckpt, uncond_run, tmp_path):
    s = synth(ckpt, tmp_path / "sub", config(n=None, per_class=3, classes=("7", "2")))
    rows = manifest(tmp_path / "sub")
    assert s.images == 6 and [r["class"] for r in rows] == ["7", "2"] * 3
    assert all(r["label"] == ckpt.classes.index(r["class"]) for r in rows)
    assert [r["file"] for r in rows[:2]] == ["7/000000.png", "2/000001.png"]
    few = synth(ckpt, tmp_path / "few", config(n=3))                  # fewer images than classes
    assert few.images == 3 and sorted(p.name for p in (tmp_path / "few").iterdir() if p.is_dir()) == ["0", "1", "2"]
    flat = synth(uncond_run, tmp_path / "flat", config(n=10))
    rows = manifest(tmp_path / "flat")
    assert flat.images == 10 and [r["file"] for r in rows] == [f"{i:06d}.png" for i in range(10)]
    assert all(r["class"] is None and r["label"] is None for r in rows)
    assert not [p for p in (tmp_path / "flat").iterdir() if p.is_dir()]


# ----------------------------------------------------------------------------------------------------
# Filters.

def test_keep_top_keeps_what_d_prefers(ckpt, tmp_path):
    from augment_gan.datasets import SyntheticImageFolder
    from augment_gan.pixels import hwc_to_nchw, to_float

    out = tmp_path / "top"
    s = synth(ckpt, out, config(n=40, keep_top=0.25))
    assert s.images == 40 and s.dropped_keep_top == 120 and s.missing == 0
    rows = manifest(out)
    kept = [r for r in rows if r["kept"]]
    rejected = [r for r in rows if not r["kept"]]
    assert len(kept) == 40 and len(rejected) == 120 and {r["filter"] for r in rejected} == {"keep-top"}
    assert all(r["file"] is None and r["index"] is None for r in rejected)
    for c in ckpt.classes:
        k = [r["d_score"] for r in kept if r["class"] == c]
        rj = [r["d_score"] for r in rejected if r["class"] == c]
        assert len(k) == 4 and len(rj) == 12
        assert min(k) >= max(rj) and np.mean(k) >= np.mean(rj)     # the top fraction, per class
    # The recorded score is D's logit on the written image.
    r = kept[5]
    x = hwc_to_nchw(np.asarray(Image.open(out / r["file"]))[:, :, None])
    with torch.inference_mode():
        d = ckpt.D(to_float(x), torch.tensor([r["label"]])).item()
    assert d == pytest.approx(r["d_score"], abs=1e-4)
    # The kept scores are higher than those of the unfiltered set.
    plain = tmp_path / "plain"
    synth(ckpt, plain, config(n=40, keep_top=1.0))
    assert np.mean([r["d_score"] for r in manifest(plain)]) < np.mean([r["d_score"] for r in kept])
    # keep-top 1 is the unfiltered set, and survivors keep their file.
    synth(ckpt, tmp_path / "none", config(n=40))
    assert images(plain) == images(tmp_path / "none")
    for r in kept:
        if r["latent"] == r["index"]:
            assert (out / r["file"]).read_bytes() == (plain / r["file"]).read_bytes()
    # Readers of the manifest skip the rejected rows.
    assert len(SyntheticImageFolder(out)) == 40


class _CopyingGenerator(torch.nn.Module):
    """Wraps G: latents whose first coordinate is > 0.8 get a (slightly noisy) training image instead."""

    def __init__(self, g: torch.nn.Module, reals: torch.Tensor):
        super().__init__()
        self.g, self.reals = g, reals

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.g(z, y).clone()
        copy = z[:, 0] > 0.8
        which = (z[:, 1].abs() * 1000).long() % len(self.reals)
        noise = 0.01 * torch.sign(z[:, 2:3, None, None])              # about one grey level
        out[copy] = (self.reals[which] + noise)[copy].clamp(-1, 1)
        return out


def test_dedup_drops_injected_copies(ckpt, digits100, tmp_path):
    from augment_gan.data import ReadOptions, load_folder
    from augment_gan.pixels import hwc_to_nchw, to_float

    reals = to_float(hwc_to_nchw(load_folder(digits100, ReadOptions(resolution=32, channels="gray"),
                                             progress=False, use_cache=False).images))
    copying = dataclasses.replace(ckpt, G_ema=_CopyingGenerator(ckpt.G_ema, reals))
    z = sample.latents(0, range(300), ckpt.z_dim)
    copies = {i for i in range(300) if z[i, 0] > 0.8}
    assert 4 <= len([i for i in copies if i < 60]) < 30

    s = synth(copying, tmp_path / "dedup", config(dedup=True, dedup_real=str(digits100)))
    rows = manifest(tmp_path / "dedup")
    dropped = {r["latent"] for r in rows if r["filter"] == "dedup"}
    assert dropped == {i for i in copies if i < 60}
    assert s.dropped_dedup == len(dropped) == s.missing and s.images == 60 - len(dropped)
    assert all(not (tmp_path / "dedup" / f"{i % 10}" / f"{i:06d}.png").exists() for i in dropped)
    assert all(r["nn_distance"] >= s.dedup_threshold for r in rows if r["kept"])
    assert 0 < s.dedup_threshold < 0.5
    # With keep-top the oversampled pool refills the gaps, still without copies.
    both = synth(copying, tmp_path / "both", config(dedup=True, dedup_real=str(digits100), keep_top=0.5))
    rows = manifest(tmp_path / "both")
    kept = [r for r in rows if r["kept"]]
    assert both.missing == 0 and len(kept) == 60
    assert not {r["latent"] for r in kept} & copies
    assert {r["latent"] for r in rows if r["filter"] == "dedup"} == {i for i in copies if i in
                                                                      {r["latent"] for r in rows}}
    # Without --dedup-real the folder recorded in the checkpoint is used.
    recorded = synth(copying, tmp_path / "recorded", config(n=20, dedup=True))
    assert recorded.dedup_threshold == pytest.approx(s.dedup_threshold)


# ----------------------------------------------------------------------------------------------------
# The command line.

def _one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_cli_writes_and_reports(tiny_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["synth", str(tiny_run), "--n", "20", "--out", str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["images"] == 20 and summary["manifest"] == str(out / "manifest.jsonl")
    result = runner.invoke(app, ["synth", str(tiny_run), "--n", "20", "--out", str(out), "--quiet"])
    assert result.exit_code == 0 and "0 written, 20 already there" in result.output


@pytest.mark.parametrize("args,message", [
    (["--n", "5", "--per-class", "2"], "--n N, --per-class N or --balance"),
    ([], "--n N, --per-class N or --balance"),
    (["--n", "5", "--shard", "2/2"], "0 <= K < N"),
    (["--n", "5", "--shard", "x"], "K/N"),
    (["--n", "5", "--classes", "3,cow"], "unknown classes cow"),
    (["--n", "5", "--quality", "90"], "png is lossless"),
    (["--n", "5", "--keep-top", "1.5"], "fraction in \\(0, 1\\]"),
    (["--n", "5", "--dedup-real", "x"], "needs --dedup"),
    (["--n", "5", "--device", "tpu"], "unknown device"),
])
def test_cli_one_line_errors(tiny_run, tmp_path, args, message):
    result = CliRunner().invoke(app, ["synth", str(tiny_run), "--out", str(tmp_path / "o"), "--quiet", *args])
    assert __import__("re").search(message, _one_line_error(result))


def test_cli_errors_for_bad_inputs(tiny_run, tmp_path):
    runner = CliRunner()
    line = _one_line_error(runner.invoke(app, ["synth", str(tmp_path / "nope"), "--n", "3", "--out", str(tmp_path / "o")]))
    assert "not found" in line
    # An untrusted checkpoint whose class name would escape the output folder.
    from fixtures_run import TINY_NETS, save_random_checkpoint

    evil = tmp_path / "evil-run"
    save_random_checkpoint(evil, TrainConfig(resolution=32, kimg=1, minutes=None, **TINY_NETS), 1, ["ok", "../escape"])
    out = tmp_path / "inside" / "out"
    line = _one_line_error(runner.invoke(app, ["synth", str(evil), "--n", "4", "--out", str(out), "--quiet"]))
    assert "path separator" in line
    assert not (tmp_path / "inside").exists() and not (tmp_path / "escape").exists()
