"""`synth --format tar` and `SyntheticTarDataset`: the same images and rows as a per-file set, webdataset
layout, process shards, resume, filters, and the dataset under samplers and DataLoader workers."""
from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, DistributedSampler

from augment_gan import tarshards
from augment_gan.checkpoint import load_checkpoint
from augment_gan.cli import app
from augment_gan.datasets import SyntheticImageFolder, SyntheticTarDataset
from augment_gan.errors import UserError
from augment_gan.mixing import DistributedMixedSampler, MixedDataset
from augment_gan.synth import SynthConfig, synth
from fakesynth import write_tiny_checkpoint

CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return load_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("tar-run"), CLASSES))


def config(**options) -> SynthConfig:
    return SynthConfig(progress=False, device="cpu", **{"n": 1100, "format": "tar", "images_per_tar": 256, **options})


def tars(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.tar"))}


def pixels(image) -> np.ndarray:
    return np.asarray(image)


def to_tensor(image) -> torch.Tensor:
    """PIL -> uint8 H×W×C tensor (a module-level function: DataLoader workers and pickle need one)."""
    return torch.from_numpy(pixels(image).copy())


@pytest.fixture(scope="module")
def sets(ckpt, tmp_path_factory):
    """The same 1,100 images as files and as tar shards of 256: a unit holds one class, so 6 shards, of
    256 images (classes 0, 1, 2), then 111, 111 and 110."""
    root = tmp_path_factory.mktemp("sets")
    synth(ckpt, root / "files", config(format="png", images_per_tar=None))
    summary = synth(ckpt, root / "tar", config())
    return root / "files", root / "tar", summary


def test_tar_set_holds_the_per_file_set(sets):
    files, tar, summary = sets
    assert summary.images == summary.written == 1100 and summary.manifest == str(tar / "manifest.jsonl")
    assert sorted(p.name for p in tar.iterdir() if not p.name.startswith(".")) == \
        ["manifest.jsonl", *(f"shard-{t:06d}.tar" for t in range(6)), "synth.json"]
    # Webdataset samples: <index>.png, its manifest row as <index>.json, its label as <index>.cls, in a row.
    with tarfile.open(tar / "shard-000001.tar") as archive:
        members = archive.getmembers()
        assert [m.name for m in members[:3]] == ["000001.png", "000001.json", "000001.cls"]
        assert len(members) == 3 * 256 and all(m.mtime == 0 and m.isfile() for m in members)
        row = json.loads(archive.extractfile(members[1]).read())
        assert archive.extractfile(members[2]).read() == b"1" and row["class"] == "dog" and row["label"] == 1
        png = archive.extractfile(members[0]).read()
    assert png == (files / "dog" / "000001.png").read_bytes()
    # One row type: the merged manifest holds the rows inside the shards; only `file` differs from files'.
    rows = [json.loads(line) for line in (tar / "manifest.jsonl").read_text().splitlines()]
    assert row in rows and rows[1]["file"] == "shard-000001.tar/000001.png"
    per_file = [json.loads(line) for line in (files / "manifest.jsonl").read_text().splitlines()]
    assert [{**r, "file": None} for r in rows] == [{**r, "file": None} for r in per_file]

    dataset, folder = SyntheticTarDataset(tar), SyntheticImageFolder(files)
    assert len(dataset) == len(folder) == 1100 and dataset.classes == folder.classes == CLASSES
    assert dataset.targets == folder.targets and list(dataset.indices[:4]) == [0, 1, 2, 3]
    for i in (0, 1, 2, 255, 256, 700, 1099, -1):
        (a, y), (b, z) = dataset[i], folder[i]
        assert y == z and a.mode == b.mode == "RGB" and np.array_equal(pixels(a), pixels(b))
    assert dataset.row(5).file == "shard-000002.tar/000005.png" and dataset.row(5).latent == 5  # class 2
    assert dataset[7][0].size == (32, 32)
    assert SyntheticTarDataset(tar, mode=None)[7][0].mode == "L"
    assert SyntheticTarDataset(tar, size=28)[7][0].size == (28, 28)
    with pytest.warns(UserWarning, match="no images of class\\(es\\) eel"):
        aligned = SyntheticTarDataset(tar, class_to_idx={"owl": 0, "cat": 1, "dog": 2, "eel": 3})
    assert aligned[0][1] == 1 and aligned[2][1] == 0
    with pytest.raises(UserError, match="read it with SyntheticTarDataset"):
        SyntheticImageFolder(tar)
    with pytest.raises(UserError, match="read it with SyntheticImageFolder"):
        SyntheticTarDataset(files)


def test_dataset_under_samplers_workers_and_pickle(sets):
    _, tar, _ = sets
    dataset = SyntheticTarDataset(tar, transform=to_tensor)
    dataset[0]  # opens a shard in this process; the copies below must not share it
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy[300][0], dataset[300][0])
    seen = []
    for rank in range(2):  # two DDP ranks: disjoint halves of one epoch, the same on every call
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        batches = list(DataLoader(dataset, batch_size=100, sampler=sampler, num_workers=2))
        again = list(DataLoader(dataset, batch_size=100, sampler=sampler, num_workers=0))
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
        seen += list(sampler)
    assert sorted(seen) == list(range(1100))
    mixed = MixedDataset(dataset, dataset, ratio=0.5)
    order = list(DistributedMixedSampler(mixed, num_replicas=2, rank=1, seed=0))
    assert order and mixed[order[0]][0].shape == (32, 32, 3)


def test_process_shards_and_resume_write_the_same_bytes(ckpt, sets, tmp_path):
    _, reference, _ = sets
    out = tmp_path / "sharded"
    first = synth(ckpt, out, config(shard=(0, 2)))
    assert first.manifest is None and sorted(tars(out)) == ["shard-000000.tar", "shard-000002.tar", "shard-000004.tar"]
    with pytest.raises(UserError, match="incomplete"):
        SyntheticTarDataset(out)
    last = synth(ckpt, out, config(shard=(1, 2), batch_size=100))
    assert last.manifest and tars(out) == tars(reference)
    assert (out / "manifest.jsonl").read_bytes() == (reference / "manifest.jsonl").read_bytes()

    # What a kill leaves: a shard that never got renamed (its temporary), and one that was cut short later.
    (out / "shard-000003.tar").rename(out / "shard-000003.tar.tmp-999999")
    cut = out / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[:5000])
    resumed = synth(ckpt, out, config(batch_size=64))
    assert resumed.written == 256 + 111 and resumed.existing == 1100 - 367 and resumed.images == 1100
    assert not list(out.glob("*.tmp-*")) and tars(out) == tars(reference)
    assert synth(ckpt, out, config()).written == 0


def test_a_crash_leaves_whole_shards_only(ckpt, sets, tmp_path, monkeypatch):
    _, reference, _ = sets
    real_encode, calls = tarshards._encode, []

    def crashing(images):
        calls.append(1)
        if len(calls) == 5:  # a failure mid-run: images 400-499 of the stream, in shard 1 (256-511)
            raise RuntimeError("simulated crash")
        return real_encode(images)

    monkeypatch.setattr(tarshards, "_encode", crashing)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        synth(ckpt, out, config(batch_size=100, workers=1))
    monkeypatch.setattr(tarshards, "_encode", real_encode)
    assert sorted(tars(out)) == ["shard-000000.tar"] and not list(out.glob("*.tmp-*"))
    assert synth(ckpt, out, config()).written == 1100 - 256
    assert tars(out) == tars(reference)


def test_filters_and_empty_shards(ckpt, tmp_path):
    """keep-top through tar shards gives the per-file set's images; a shard whose images all go is still written."""
    files = synth(ckpt, tmp_path / "files", config(n=600, keep_top=0.5, format="png", images_per_tar=None))
    tar = synth(ckpt, tmp_path / "tar", config(n=600, keep_top=0.5))
    assert tar.images == files.images == 600 and tar.dropped_keep_top == files.dropped_keep_top == 600
    a, b = SyntheticTarDataset(tmp_path / "tar"), SyntheticImageFolder(tmp_path / "files")
    assert a.targets == b.targets and all(np.array_equal(pixels(a[i][0]), pixels(b[i][0])) for i in (0, 299, 599))
    # A writer told of a shard that receives no image still writes it (empty), in order.
    out = tmp_path / "empty"
    out.mkdir()
    writer = tarshards.TarWriter(out, ["shard-000000.tar", "shard-000001.tar"], 1, lambda rows: None)
    writer.close(True)
    assert all(tarshards.complete_tar(out / f"shard-00000{t}.tar") for t in (0, 1))
    with tarfile.open(out / "shard-000001.tar") as archive:
        assert archive.getmembers() == []


def test_options_and_cli(ckpt, tmp_path):
    with pytest.raises(UserError, match="multiple of 256"):
        config(images_per_tar=1000)
    with pytest.raises(UserError, match="applies to --format tar"):
        config(format="png")
    with pytest.raises(UserError, match="lossless"):
        config(quality=90)
    synth(ckpt, tmp_path / "set", config(n=300))
    with pytest.raises(UserError, match="images_per_tar 256 -> 512"):
        synth(ckpt, tmp_path / "set", config(n=300, images_per_tar=512))
    result = CliRunner().invoke(app, ["synth", str(ckpt.path), "--n", "300", "--out", str(tmp_path / "cli"),
                                      "--format", "tar", "--images-per-tar", "256", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert tars(tmp_path / "cli") == tars(tmp_path / "set")
