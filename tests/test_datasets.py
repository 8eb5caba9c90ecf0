"""Torchvision-facing datasets: synthetic folders aligned to real classes, and the real:synthetic mix."""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from augment_gan import (DistributedMixedSampler, GeneratorDataset, MixedDataset, MixedSampler, SyntheticImageFolder,
                         load_recipe)
from augment_gan.errors import UserError
from fakesynth import write_fake_synth, write_tiny_checkpoint

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


@pytest.fixture(scope="module")
def real_digits(shared_data: Path) -> ImageFolder:
    """600 real digits per class from ../shared/data/mnist, as the user's ImageFolder would see them."""
    return ImageFolder(shared_data / "mnist")


@pytest.fixture(scope="module")
def fake_synth_folder(shared_data: Path, tmp_path_factory) -> Path:
    """A `synth`-style folder (manifest, synth.json, kept flags) holding real digits, 12 per class (10 kept)."""
    return write_fake_synth(shared_data / "mnist", tmp_path_factory.mktemp("synth") / "digits", per_class=10,
                            rejected_per_class=2, size=32)


# ---------------------------------------------------------------------------------------------------------
# SyntheticImageFolder.

def test_synthetic_folder_reads_kept_images_with_real_labels(fake_synth_folder, real_digits):
    synthetic = SyntheticImageFolder(fake_synth_folder, class_to_idx=real_digits.class_to_idx)
    assert len(synthetic) == 100  # 10 kept per class; the 2 rejected per class are skipped
    assert synthetic.classes == real_digits.classes
    assert Counter(synthetic.targets) == {label: 10 for label in range(10)}
    image, label = synthetic[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert synthetic.records[0]["kept"] is True
    for path, target in synthetic.samples:  # each file sits in its class's folder
        assert Path(path).parent.name == real_digits.classes[target]


def test_synthetic_folder_with_recipe_transform(fake_synth_folder, real_digits):
    synthetic = SyntheticImageFolder(fake_synth_folder, transform=load_recipe("standard", part="synthetic", seed=0),
                                     class_to_idx=real_digits.class_to_idx)
    x, y = synthetic[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    batch_x, batch_y = next(iter(DataLoader(synthetic, batch_size=16, shuffle=True)))
    assert batch_x.shape == (16, 3, 32, 32) and batch_y.shape == (16,)


def test_synthetic_folder_is_a_vision_dataset_like_image_folder(fake_synth_folder, real_digits):
    from torchvision.datasets import VisionDataset

    synthetic = SyntheticImageFolder(fake_synth_folder, transform=lambda im: im.size, target_transform=str)
    assert isinstance(synthetic, VisionDataset)
    # What code written for ImageFolder touches is there, with the same meaning.
    for name in ("root", "transform", "target_transform", "transforms", "loader", "classes", "class_to_idx",
                 "samples", "targets", "imgs", "find_classes"):
        assert hasattr(synthetic, name) and hasattr(real_digits, name), name
    assert synthetic.find_classes(fake_synth_folder) == (synthetic.classes, synthetic.class_to_idx)
    assert synthetic.classes == real_digits.classes
    assert synthetic[0] == ((32, 32), "0")
    synthetic.transform = None  # swapped after construction, as with ImageFolder
    assert isinstance(synthetic[0][0], Image.Image)
    joint = SyntheticImageFolder(fake_synth_folder, transforms=lambda im, y: (im.mode, y + 100))
    assert joint[0] == ("RGB", 100)
    with pytest.raises(UserError, match="either transforms or transform"):
        SyntheticImageFolder(fake_synth_folder, transform=str, transforms=lambda im, y: (im, y))


def test_labels_are_remapped_by_class_name(tmp_path, shared_data, real_digits):
    # A generator trained on digits 3 and 7 only numbers them 0 and 1; aligned to the full real set they
    # must become 3 and 7. The real classes the synthetic set lacks are a warning, not an error.
    folder = write_fake_synth(shared_data / "mnist", tmp_path / "s", classes=["3", "7"], per_class=4)
    with pytest.warns(UserWarning, match="no images of class"):
        synthetic = SyntheticImageFolder(folder, class_to_idx=real_digits.class_to_idx)
    assert sorted(set(synthetic.targets)) == [3, 7]
    assert [r["label"] for r in synthetic.records][:1] == [0]  # the manifest keeps the checkpoint's numbering
    own = SyntheticImageFolder(folder)
    assert own.class_to_idx == {"3": 0, "7": 1} and sorted(set(own.targets)) == [0, 1]


def test_class_mismatch_is_a_clear_error(tmp_path, shared_data):
    folder = write_fake_synth(shared_data / "emoji-twitter", tmp_path / "s", classes=["flags", "symbols"], per_class=2)
    real = {"flags": 0, "food-drink": 1}
    with pytest.raises(UserError, match="has class\\(es\\) the real set lacks: symbols \\(real classes it lacks: food-drink\\)"):
        SyntheticImageFolder(folder, class_to_idx=real)


def test_unconditional_folder(tmp_path, shared_data):
    folder = write_fake_synth(shared_data / "mnist", tmp_path / "u", classes=["1", "2"], per_class=3,
                              conditional=False)
    synthetic = SyntheticImageFolder(folder)
    assert len(synthetic) == 6 and set(synthetic.targets) == {-1} and synthetic.classes == []
    with pytest.raises(UserError, match="unconditional"):
        SyntheticImageFolder(folder, class_to_idx={"1": 0, "2": 1})
    with pytest.raises(UserError, match="unlabeled"):
        MixedDataset(ImageFolder(shared_data / "mnist"), synthetic, 0.25)


def test_missing_files_are_skipped_with_a_warning(tmp_path, shared_data):
    folder = write_fake_synth(shared_data / "mnist", tmp_path / "s", classes=["4"], per_class=3, rejected_per_class=0)
    (folder / "4" / "000001.png").unlink()
    with pytest.warns(UserWarning, match="1 image\\(s\\) marked kept .* missing on disk"):
        synthetic = SyntheticImageFolder(folder)
    assert len(synthetic) == 2


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ('{"file": "4/x.png"}', "missing key\\(s\\) class, label, kept"),
    ('{"file": "../outside.png", "class": "4", "label": 0, "kept": true}', "relative path inside the folder"),
    ('{"file": "/etc/passwd", "class": "4", "label": 0, "kept": true}', "relative path inside the folder"),
    ('{"file": "4/000000.png", "class": "5", "label": 0, "kept": true}', "do not match the classes in synth.json"),
])
def test_bad_manifest_lines(tmp_path, shared_data, line, message):
    folder = write_fake_synth(shared_data / "mnist", tmp_path / "s", classes=["4"], per_class=1, rejected_per_class=0)
    with open(folder / "manifest.jsonl", "a") as f:
        f.write(line + "\n")
    with pytest.raises(UserError, match=message):
        SyntheticImageFolder(folder)


def test_not_a_synth_folder(tmp_path):
    with pytest.raises(UserError, match="no manifest.jsonl"):
        SyntheticImageFolder(DIGITS)
    with pytest.raises(UserError, match="not found"):
        SyntheticImageFolder(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------------
# MixedDataset and its samplers.

def _fraction(dataset: MixedDataset, indices) -> float:
    return sum(dataset.is_synthetic(i) for i in indices) / len(indices)


@pytest.mark.parametrize("n_real", [40, 2000])  # synthetic set (100) far larger / far smaller than needed
def test_mixed_sampler_holds_the_ratio_per_epoch_and_batch(real_digits, fake_synth_folder, n_real):
    real = Subset(real_digits, range(0, 6000, 6000 // n_real))
    synthetic = SyntheticImageFolder(fake_synth_folder, class_to_idx=real_digits.class_to_idx)
    mixed = MixedDataset(real, synthetic, ratio=0.25)
    sampler = MixedSampler(mixed, seed=0)
    epochs = [list(sampler) for _ in range(3)]
    seen = [i for epoch in epochs for i in epoch]
    assert abs(_fraction(mixed, seen) - 0.25) < 0.005
    for epoch in epochs:
        assert len(epoch) == len(sampler) == n_real + round(n_real / 3)
        assert sorted(i for i in epoch if i < n_real) == list(range(n_real))  # every real image once
        for start in range(0, len(epoch) - 32 + 1, 32):  # every full batch of 32 holds 8 ± 1 synthetic
            assert abs(sum(mixed.is_synthetic(i) for i in epoch[start:start + 32]) - 8) <= 1
    synthetic_seen = [i - n_real for i in seen if i >= n_real]
    counts = Counter(synthetic_seen)
    # Drawn without replacement across epochs: no synthetic image repeats before all have been used.
    assert max(counts.values()) - min(counts.get(i, 0) for i in range(len(synthetic))) <= 1
    assert epochs[0] != epochs[1]
    replay = MixedSampler(mixed, seed=0)
    assert list(replay) == epochs[0]
    replay.set_epoch(2)
    assert list(replay) == epochs[2]


def test_mixed_loader_yields_real_and_synthetic_batches(real_digits, fake_synth_folder):
    recipe = load_recipe("light", seed=0)
    real = ImageFolder(DIGITS, transform=lambda im: recipe(im.resize((32, 32))))
    synthetic = SyntheticImageFolder(fake_synth_folder, transform=load_recipe("light", part="synthetic", seed=0),
                                     class_to_idx=real.class_to_idx)
    mixed = MixedDataset(real, synthetic, ratio=0.25)
    loader = DataLoader(mixed, batch_size=40, sampler=MixedSampler(mixed, seed=1))
    x, y = next(iter(loader))
    assert x.shape == (40, 3, 32, 32) and y.min() >= 0 and y.max() <= 9
    assert len(loader) == -(-(len(real) + round(len(real) / 3)) // 40)


def test_distributed_sampler_splits_ranks(real_digits, fake_synth_folder):
    real = Subset(real_digits, range(0, 6000, 60))  # 100 real
    synthetic = SyntheticImageFolder(fake_synth_folder, class_to_idx=real_digits.class_to_idx)
    mixed = MixedDataset(real, synthetic, ratio=0.25)
    ranks = [DistributedMixedSampler(mixed, num_replicas=3, rank=r, seed=4) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(5)
    orders = [list(s) for s in ranks]
    assert all(len(o) == len(ranks[0]) == 34 + 11 for o in orders)
    real_seen = Counter(i for o in orders for i in o if i < 100)
    assert set(real_seen) == set(range(100)) and sum(real_seen.values()) == 102  # 2 padded repeats
    for order in orders:
        assert abs(_fraction(mixed, order) - 0.25) < 0.02
    synthetic_seen = [i for o in orders for i in o if i >= 100]
    assert len(synthetic_seen) == len(set(synthetic_seen)) == 33  # disjoint slices of one global draw
    ranks[0].set_epoch(6)
    assert list(ranks[0]) != orders[0]
    with pytest.raises(UserError, match="num_replicas and rank"):
        DistributedMixedSampler(mixed)


def test_mixed_dataset_checks_classes_and_ratio(real_digits, fake_synth_folder, tmp_path, shared_data):
    folder = write_fake_synth(shared_data / "mnist", tmp_path / "s", classes=["3", "7"], per_class=2)
    unaligned = SyntheticImageFolder(folder)  # numbers 3 and 7 as 0 and 1
    with pytest.raises(UserError, match="number their classes differently"):
        MixedDataset(real_digits, unaligned, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aligned = SyntheticImageFolder(folder, class_to_idx=real_digits.class_to_idx)
    assert len(MixedDataset(real_digits, aligned, 0.25)) == len(real_digits) + 4
    with pytest.raises(UserError, match="ratio must be in \\[0, 1\\)"):
        MixedDataset(real_digits, aligned, 1.0)
    with pytest.raises(UserError, match="synthetic dataset is empty"):
        MixedDataset(real_digits, None, 0.25)
    real_only = MixedDataset(real_digits, None, 0.0)
    assert len(MixedSampler(real_only)) == len(real_digits)


def test_synth_json_is_optional(tmp_path, shared_data):
    folder = write_fake_synth(shared_data / "mnist", tmp_path / "s", classes=["2", "9"], per_class=2)
    (folder / "synth.json").unlink()
    synthetic = SyntheticImageFolder(folder)
    assert synthetic.classes == ["2", "9"] and len(synthetic) == 4
    assert json.loads((folder / "manifest.jsonl").read_text().splitlines()[0])["class"] == "2"


# ---------------------------------------------------------------------------------------------------------
# GeneratorDataset. The generator is a small untrained one: what is tested is the plumbing (per-index
# determinism, batching, labels, workers), not image quality.

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("run"), [str(i) for i in range(10)])


def test_generator_dataset_is_deterministic_per_index(tiny_checkpoint, real_digits):
    from augment_gan.checkpoint import load_checkpoint
    from augment_gan.sample import generate

    ds = GeneratorDataset(tiny_checkpoint, 20, seed=3, batch_size=8, class_to_idx=real_digits.class_to_idx)
    image, label = ds[13]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
    assert label == 3 and ds.targets[:12] == list(range(10)) + [0, 1]  # balanced by default
    # Same pixels whatever the batching and the order of access, and the same as sample.generate.
    other = GeneratorDataset(tiny_checkpoint, 20, seed=3, batch_size=5, mode="L")
    reference = generate(load_checkpoint(tiny_checkpoint), [13], seed=3)[0, 0].numpy()
    assert (np.asarray(other[13][0]) == reference).all() and (np.asarray(image)[:, :, 0] == reference).all()
    assert (np.asarray(ds[19][0]) != np.asarray(ds[18][0])).any()
    assert (np.asarray(GeneratorDataset(tiny_checkpoint, 20, seed=4)[13][0]) != np.asarray(image)).any()


def test_generator_dataset_with_workers_matches_the_main_process(tiny_checkpoint):
    ds = GeneratorDataset(tiny_checkpoint, 24, seed=1, batch_size=8, transform=load_recipe("none"),
                          labels=["7"] * 24)
    assert set(ds.targets) == {7}
    single = torch.cat([x for x, _ in DataLoader(ds, batch_size=8)])
    # Under "spawn" workers get the pickled state, without the modules; each loads the checkpoint itself.
    state = ds.__getstate__()
    assert state["_ckpt"] is None and state["_cache"] is None
    # Spawned workers re-import torch (~15 s each on a busy 2-core machine), so fork and drop the loaded
    # checkpoint by hand: the workers then take the same lazy-loading path.
    ds._ckpt, ds._cache = None, None
    workers = torch.cat([x for x, _ in DataLoader(ds, batch_size=8, num_workers=2)])
    assert single.shape == (24, 3, 32, 32) and torch.equal(single, workers)
    assert ds._ckpt is None  # the main process did not load it again; the workers did


def test_generator_dataset_label_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(UserError, match="labels has 2 entries for n=3"):
        GeneratorDataset(tiny_checkpoint, 3, labels=[1, 2])
    with pytest.raises(UserError, match="unknown class 'x'"):
        GeneratorDataset(tiny_checkpoint, 1, labels=["x"])
    with pytest.raises(UserError, match="real set lacks: 9"):
        GeneratorDataset(tiny_checkpoint, 1, class_to_idx={str(i): i for i in range(9)})
    unconditional = write_tiny_checkpoint(tmp_path / "u", [])
    ds = GeneratorDataset(unconditional.parent.parent, 4)  # a run directory resolves to its latest checkpoint
    assert ds.targets == [-1] * 4 and ds[0][0].size == (32, 32)
    with pytest.raises(UserError, match="unconditional"):
        GeneratorDataset(unconditional, 4, labels="balanced")


def test_rejected_candidates_without_files_are_skipped(tmp_path, shared_data):
    # synth --keep-top/--dedup records candidates it decided not to write: file null, kept false.
    folder = write_fake_synth(shared_data / "mnist", tmp_path / "s", classes=["5"], per_class=2, rejected_per_class=0)
    with open(folder / "manifest.jsonl", "a") as f:
        f.write(json.dumps({"file": None, "index": None, "seed": 0, "class": "5", "label": 0, "truncation": 1.0,
                            "checkpoint": "0" * 64, "d_score": -3.0, "kept": False, "filter": "keep-top"}) + "\n")
    assert len(SyntheticImageFolder(folder)) == 2
