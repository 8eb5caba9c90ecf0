"""`augment-gan merge` and `augment-gan recipes`: counts, provenance, determinism, refusal to overwrite."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from augment_gan.cli import app
from augment_gan.errors import UserError
from augment_gan.merge import merge_folders
from augment_gan.recipes import read_recipe_text
from fakesynth import copy_classes, write_fake_synth


def _small_real(source: Path, dest: Path, classes: list[str], per_class: int) -> Path:
    for name in classes:
        (dest / name).mkdir(parents=True)
        for file in sorted((source / name).iterdir())[:per_class]:
            shutil.copy(file, dest / name / file.name)
    return dest


@pytest.fixture
def real_digits(shared_data, tmp_path) -> Path:
    """24 real digits (8 each of 1, 4, 7) in an ImageFolder layout."""
    return _small_real(shared_data / "mnist", tmp_path / "real", ["1", "4", "7"], 8)


@pytest.fixture
def fake_synth_folder(shared_data, tmp_path) -> Path:
    """A `synth`-style folder of real digits at 32 px: 5 kept + 1 rejected per class."""
    return write_fake_synth(shared_data / "mnist", tmp_path / "synth", classes=["1", "4", "7"], per_class=5,
                            rejected_per_class=1, size=32)


def _images(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.png"))


def test_merge_writes_expected_counts_and_provenance(real_digits, fake_synth_folder, tmp_path):
    out = tmp_path / "merged"
    summary = merge_folders(real_digits, fake_synth_folder, out, "standard", copies=2, seed=1, progress=False)
    files = _images(out)
    # 24 real × 2 copies = 48 real; standard mixes 25% synthetic: 0.25 / 0.75 × 48 = 16 synthetic.
    assert summary["counts"] == {"real_images": 24, "real": 48, "synthetic": 16, "synthetic_available": 15,
                                 "total": 64, "per_class": summary["counts"]["per_class"]}
    assert len(files) == 64
    names = Counter(p.name.split("-")[0] for p in files)
    assert names == {"real": 48, "synth": 16}
    assert {p.parent.name for p in files} == {"1", "4", "7"}
    for cls in ("1", "4", "7"):  # the real class balance holds for the synthetic images too
        assert sum(1 for p in files if p.parent.name == cls and p.name.startswith("real")) == 16
        assert sum(1 for p in files if p.parent.name == cls and p.name.startswith("synth")) in (5, 6)
    # One resolution and channel count: the synthetic size (32 px), grayscale like the real digits.
    for path in files[:5] + files[-5:]:
        with Image.open(path) as image:
            assert image.size == (32, 32) and image.mode == "L"
    meta = json.loads((out / "merge.json").read_text())
    assert meta["complete"] and meta["recipe"] == "standard" and meta["classes"] == ["1", "4", "7"]
    assert meta["recipe_definition"]["mix"]["synthetic_ratio"] == 0.25
    lines = [json.loads(line) for line in (out / "merge.jsonl").read_text().splitlines()]
    assert sorted(line["file"] for line in lines) == sorted(p.relative_to(out).as_posix() for p in files)
    synthetic = [line for line in lines if line["source"] == "synthetic"]
    # Only kept synthetic images are used; 15 kept for 16 outputs, so exactly one is reused.
    kept = {json.loads(l)["file"] for l in (fake_synth_folder / "manifest.jsonl").read_text().splitlines()
            if json.loads(l)["kept"]}
    assert {line["origin"] for line in synthetic} == kept
    assert all(line["origin"].split("/")[0] == line["class"] for line in lines)
    # Augmented: real outputs differ from a plain resize of their source.
    first = next(line for line in lines if line["source"] == "real")
    assert np.asarray(Image.open(out / first["file"])).std() > 0


def test_merge_is_deterministic_and_seed_dependent(real_digits, fake_synth_folder, tmp_path):
    a = merge_folders(real_digits, fake_synth_folder, tmp_path / "a", "heavy", seed=3, progress=False)
    merge_folders(real_digits, fake_synth_folder, tmp_path / "b", "heavy", seed=3, progress=False)
    merge_folders(real_digits, fake_synth_folder, tmp_path / "c", "heavy", seed=4, progress=False)
    files_a = [p.relative_to(tmp_path / "a") for p in _images(tmp_path / "a")]
    assert a["counts"]["synthetic"] == 24  # heavy: half synthetic -> 1 : 1
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    assert any(not (tmp_path / "c" / f).exists() or (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
               for f in files_a)


def test_merge_refuses_to_overwrite(real_digits, fake_synth_folder, tmp_path):
    out = tmp_path / "merged"
    merge_folders(real_digits, fake_synth_folder, out, "light", copies=2, progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        merge_folders(real_digits, fake_synth_folder, out, "light", progress=False)
    assert len(_images(out)) == 64
    summary = merge_folders(real_digits, fake_synth_folder, out, "light", copies=1, overwrite=True, progress=False)
    assert len(_images(out)) == summary["counts"]["total"] == 32  # the old copy-1 files are gone
    assert (out / "notes.txt").read_text() == "mine"  # files merge did not write stay
    assert not list(out.rglob("*.tmp-*"))

    other = tmp_path / "someone-elses"
    other.mkdir()
    (other / "keep.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not a previous merge output; refusing to delete"):
        merge_folders(real_digits, fake_synth_folder, other, "light", overwrite=True, progress=False)
    assert (other / "keep.png").read_bytes() == b"x"
    with pytest.raises(UserError, match="must not contain each other"):
        merge_folders(real_digits, fake_synth_folder, real_digits / "merged", "light", progress=False)


def test_merge_class_mismatch_and_real_only_recipes(real_digits, shared_data, tmp_path):
    wrong = write_fake_synth(shared_data / "mnist", tmp_path / "wrong", classes=["1", "9"], per_class=2)
    with pytest.raises(UserError, match="real set lacks: 9"):
        merge_folders(real_digits, wrong, tmp_path / "out", "light", progress=False)
    odd_size = write_fake_synth(shared_data / "mnist", tmp_path / "odd", classes=["1"], per_class=2)  # 28 px
    with pytest.raises(UserError, match="the synthetic images are 28×28; pass --resolution"):
        merge_folders(real_digits, odd_size, tmp_path / "out", "light", progress=False)
    assert not (tmp_path / "out").exists()  # nothing written before the checks
    data = yaml.safe_load(read_recipe_text("light")[1])
    data["mix"]["use_synthetic"] = False
    (tmp_path / "real-only.yaml").write_text(yaml.safe_dump(data))
    summary = merge_folders(real_digits, wrong, tmp_path / "out", tmp_path / "real-only.yaml", resolution=32,
                            progress=False)
    assert summary["counts"]["synthetic"] == 0 and len(_images(tmp_path / "out")) == 24


def test_merge_colour_images(shared_data, tmp_path):
    real = _small_real(shared_data / "emoji-twitter", tmp_path / "real", ["flags", "symbols"], 6)
    synthetic = write_fake_synth(shared_data / "emoji-twitter", tmp_path / "synth", classes=["flags", "symbols"],
                                 per_class=3, rejected_per_class=0, size=64)
    summary = merge_folders(real, synthetic, tmp_path / "out", "standard", progress=False)
    assert summary["channels"] == 3 and summary["counts"]["synthetic"] == 4
    with Image.open(next((tmp_path / "out" / "flags").glob("real-*.png"))) as image:
        assert image.mode == "RGB" and image.size == (64, 64)


# ---------------------------------------------------------------------------------------------------------
# --balance.

@pytest.fixture
def long_tail(shared_data, tmp_path) -> Path:
    """A long-tailed ImageFolder: 6, 3 and 1 digits of classes 1, 4 and 7 (real indices 0-5, 6-8, 9)."""
    for cls, n in (("1", 6), ("4", 3), ("7", 1)):
        copy_classes(shared_data / "mnist", tmp_path / "long-tail", 0, n, classes=(cls,))
    return tmp_path / "long-tail"


def _per_class(out: Path) -> dict[str, Counter]:
    return {cls: Counter(p.name.split("-")[0] for p in _images(out / cls)) for cls in ("1", "4", "7")}


def test_merge_balance_fills_classes_with_synthetic_images_then_real_copies(long_tail, fake_synth_folder, tmp_path):
    summary = merge_folders(long_tail, fake_synth_folder, tmp_path / "a", "standard", balance=True, progress=False)
    # 5 kept synthetic images per class: enough for class 4 (3 short) and class 7 (5 short).
    assert _per_class(tmp_path / "a") == {"1": {"real": 6}, "4": {"real": 3, "synth": 3}, "7": {"real": 1, "synth": 5}}
    assert summary["balance"] is True and summary["synthetic_ratio"] is None and summary["counts"]["total"] == 18
    assert all(p.name.endswith("-0.png") for p in _images(tmp_path / "a"))  # no image twice
    # Two copies each: the target is 12 per class; synthetic images run out, then real copies 2, 3, ... follow.
    summary = merge_folders(long_tail, fake_synth_folder, tmp_path / "b", "standard", copies=2, balance=True,
                            progress=False)
    assert summary["counts"]["per_class"] == {"1": {"real": 12, "synthetic": 0}, "4": {"real": 7, "synthetic": 5},
                                              "7": {"real": 7, "synthetic": 5}}
    assert sorted(p.name for p in _images(tmp_path / "b" / "7") if p.name.startswith("real")) == [
        f"real-000009-{k}.png" for k in range(7)]
    lines = [json.loads(line) for line in (tmp_path / "b" / "merge.jsonl").read_text().splitlines()]
    assert len({line["origin"] for line in lines if line["source"] == "synthetic" and line["class"] == "7"}) == 5
    assert len({line["seed"] for line in lines if line["class"] == "7"}) == 12  # each copy its own augmentation


def test_merge_balance_without_synthetic_images_of_a_class(long_tail, shared_data, tmp_path):
    partial = write_fake_synth(shared_data / "mnist", tmp_path / "partial", classes=["1", "4"], per_class=2, size=32)
    summary = merge_folders(long_tail, partial, tmp_path / "a", "light", balance=True, progress=False)
    assert _per_class(tmp_path / "a") == {"1": {"real": 6}, "4": {"real": 4, "synth": 2}, "7": {"real": 6}}
    again = merge_folders(long_tail, partial, tmp_path / "b", "light", balance=True, progress=False)
    assert [summary["counts"], summary["balance"]] == [again["counts"], True]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in (p.relative_to(tmp_path / "a") for p in _images(tmp_path / "a")))
    # Real images alone: every class filled by real copies.
    merge_folders(long_tail, None, tmp_path / "c", "light", balance=True, resolution=32, progress=False)
    assert _per_class(tmp_path / "c") == {"1": {"real": 6}, "4": {"real": 6}, "7": {"real": 6}}


def test_merge_balance_is_part_of_the_settings_and_needs_classes(long_tail, fake_synth_folder, tmp_path):
    out = tmp_path / "m"
    merge_folders(long_tail, fake_synth_folder, out, "standard", balance=True, progress=False)
    meta = json.loads((out / "merge.json").read_text())
    (out / "merge.json").write_text(json.dumps({**meta, "complete": False}))  # as if interrupted
    with pytest.raises(UserError, match="unfinished merge made with other settings"):
        merge_folders(long_tail, fake_synth_folder, out, "standard", progress=False)
    assert merge_folders(long_tail, fake_synth_folder, out, "standard", balance=True, progress=False)["complete"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for file in sorted((long_tail / "1").iterdir()):
        shutil.copy(file, flat / file.name)
    with pytest.raises(UserError, match="--balance evens out classes, but .* has no class folders"):
        merge_folders(flat, None, tmp_path / "out", "standard", balance=True, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# CLI.

def test_cli_recipes_list_and_show():
    runner = CliRunner()
    result = runner.invoke(app, ["recipes", "list"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.splitlines()] == ["heavy", "light", "none", "standard"]
    rows = json.loads(runner.invoke(app, ["recipes", "list", "--json"]).output)
    assert {row["name"]: row["synthetic_ratio"] for row in rows}["heavy"] == 0.5
    shown = runner.invoke(app, ["recipes", "show", "standard"])
    assert shown.exit_code == 0 and yaml.safe_load(shown.output)["mix"]["synthetic_ratio"] == 0.25
    missing = runner.invoke(app, ["recipes", "show", "nope"])
    assert missing.exit_code == 1 and "Error: unknown recipe 'nope'" in missing.output
    assert "Traceback" not in missing.output


def test_cli_merge(real_digits, fake_synth_folder, tmp_path):
    runner = CliRunner()
    args = ["merge", "--real", str(real_digits), "--synthetic", str(fake_synth_folder), "--recipe", "light",
            "--out", str(tmp_path / "m"), "--copies", "3", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 96 images" in result.output and "72 real, 24 synthetic" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "pass --overwrite" in again.output and "Traceback" not in again.output
    assert runner.invoke(app, args + ["--overwrite", "--json"]).exit_code == 0
    help_text = runner.invoke(app, ["merge", "--help"]).output
    assert "Example:" in help_text and "augment-gan merge --real" in help_text


def test_cli_merge_balance(long_tail, fake_synth_folder, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["merge", "--real", str(long_tail), "--synthetic", str(fake_synth_folder),
                                 "--out", str(tmp_path / "m"), "--balance", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "wrote 18 images" in result.output and "class-balanced: 10 real (0 of them extra copies), 8 synthetic" \
        in result.output
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["balance"] is True
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((long_tail / "1").iterdir()), flat / "a.png")
    bad = runner.invoke(app, ["merge", "--real", str(flat), "--out", str(tmp_path / "n"), "--balance", "--quiet"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: --balance") and bad.output.count("\n") == 1
    assert "--balance" in runner.invoke(app, ["merge", "--help"]).output
