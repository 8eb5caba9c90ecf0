"""MixedDataset: one image size (28 px real digits of examples/digits with 32 px synthetic ones), and
class-balanced epochs for long-tailed folders."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from augment_gan import (DistributedMixedSampler, GeneratorDataset, MixedDataset, MixedSampler, SyntheticImageFolder,
                         load_recipe)
from augment_gan.errors import UserError
from fakesynth import copy_classes, write_fake_synth, write_tiny_checkpoint

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"  # 500 digits, 28×28


@pytest.fixture(scope="module")
def synth32(shared_data: Path, tmp_path_factory) -> Path:
    """A `synth`-style folder of real MNIST digits re-encoded at 32 px (a generator's resolution), 4 per class."""
    return write_fake_synth(shared_data / "mnist", tmp_path_factory.mktemp("synth") / "digits", per_class=4,
                            rejected_per_class=1, size=32)


def _readme_mix(synthetic_root: Path, **synthetic_options):
    """The README's "use it in your training script" snippet, on the bundled digits."""
    recipe = load_recipe("standard", seed=0)
    train = ImageFolder(DIGITS, transform=recipe)
    synthetic = SyntheticImageFolder(synthetic_root, transform=load_recipe("standard", part="synthetic", seed=1),
                                     class_to_idx=train.class_to_idx, **synthetic_options)
    return train, synthetic, MixedDataset(train, synthetic, ratio=recipe.ratio)


def test_readme_snippet_batches_28px_real_with_32px_synthetic(synth32):
    train, synthetic, mixed = _readme_mix(synth32)
    assert Image.open(train.samples[0][0]).size == (28, 28) and synthetic[0][0].shape == (3, 32, 32)
    assert mixed.size == (28, 28)
    loader = DataLoader(mixed, batch_size=64, sampler=MixedSampler(mixed, seed=0))
    x, y = next(iter(loader))
    assert x.shape == (64, 3, 28, 28) and x.dtype == torch.float32 and y.shape == (64,)
    assert mixed.synthetic[0][0].shape == (3, 28, 28)
    # The user's synthetic dataset is left as it was; the mix holds a resized copy.
    assert synthetic.size is None and mixed.synthetic.size == (28, 28) and synthetic[0][0].shape == (3, 32, 32)


def test_mixing_names_still_import_from_datasets():
    from augment_gan import datasets, mixing

    assert datasets.MixedDataset is mixing.MixedDataset and datasets.DistributedMixedSampler is mixing.DistributedMixedSampler
    with pytest.raises(AttributeError):
        datasets.NoSuchName  # noqa: B018


def test_measuring_sizes_moves_no_random_stream(synth32):
    # The sizes are measured on item 0 through copies: a seeded recipe gives the same pixels with or
    # without the MixedDataset having been built.
    train, _, mixed = _readme_mix(synth32)
    fresh = ImageFolder(DIGITS, transform=load_recipe("standard", seed=0))
    assert torch.equal(mixed[0][0], fresh[0][0]) and torch.equal(mixed[1][0], fresh[1][0])


def test_generator_dataset_and_subsets_follow_the_real_size(tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "run", [str(i) for i in range(10)])  # a 32 px generator
    real = Subset(ImageFolder(DIGITS, transform=load_recipe("light", seed=0)), range(0, 500, 5))
    generated = GeneratorDataset(checkpoint, 16, transform=load_recipe("light", part="synthetic", seed=0),
                                 batch_size=8, class_to_idx=real.dataset.class_to_idx)
    mixed = MixedDataset(real, Subset(generated, range(8)), ratio=0.5)
    x, _ = next(iter(DataLoader(mixed, batch_size=32, sampler=MixedSampler(mixed, seed=0))))
    assert x.shape == (32, 3, 28, 28) and sum(mixed.is_synthetic(i) for i in range(len(mixed))) == 8
    assert generated.size is None and mixed.synthetic.dataset.size == (28, 28)


def test_transforms_that_set_the_size_are_left_alone(synth32):
    # examples/train_classifier.py resizes both sets to 32 px in their transforms: nothing to change.
    resize = T.Resize((32, 32))
    real = ImageFolder(DIGITS, transform=T.Compose([resize, load_recipe("none")]))
    synthetic = SyntheticImageFolder(synth32, transform=T.Compose([resize, load_recipe("none")]),
                                     class_to_idx=real.class_to_idx)
    mixed = MixedDataset(real, synthetic, ratio=0.25)
    assert mixed.synthetic is synthetic and mixed.size == (32, 32)
    assert next(iter(DataLoader(mixed, batch_size=16, sampler=MixedSampler(mixed))))[0].shape == (16, 3, 32, 32)


def test_an_explicit_size_mismatch_is_one_line(synth32):
    with pytest.raises(UserError) as error:
        _readme_mix(synth32, size=32)
    message = str(error.value)
    assert "\n" not in message and "32×32" in message and "28×28" in message and "size=" in message
    # Asking for the real size explicitly is fine.
    _, synthetic, mixed = _readme_mix(synth32, size=28)
    assert mixed.synthetic is synthetic and mixed[len(mixed) - 1][0].shape == (3, 28, 28)


def test_a_mismatch_that_cannot_be_resized_away_is_one_line(synth32):
    # A plain ImageFolder of synthetic images: not ours to resize, and its tensors would not stack.
    real = ImageFolder(DIGITS, transform=load_recipe("none"))
    foreign = ImageFolder(synth32, transform=load_recipe("none"))
    with pytest.raises(UserError) as error:
        MixedDataset(real, foreign, ratio=0.25)
    assert "\n" not in str(error.value) and "28×28" in str(error.value) and "32×32" in str(error.value)
    # A synthetic transform that fixes its own size cannot be helped by reading the images smaller.
    fixed = SyntheticImageFolder(synth32, transform=T.Compose([T.Resize((32, 32)), load_recipe("none")]),
                                 class_to_idx=real.class_to_idx)
    with pytest.raises(UserError, match="sets its own size"):
        MixedDataset(real, fixed, ratio=0.25)


def test_synthetic_datasets_resize_before_the_transform(synth32):
    assert SyntheticImageFolder(synth32, size=20)[0][0].size == (20, 20)
    assert SyntheticImageFolder(synth32, size=(24, 16))[0][0].size == (16, 24)  # (height, width), as T.Resize
    for bad in (0, (28,), "28", True):
        with pytest.raises(UserError, match="size must be a positive integer"):
            SyntheticImageFolder(synth32, size=bad)


# ---------------------------------------------------------------------------------------------------------
# balance=True: every class n_max times per epoch, synthetic images before real repeats.

@pytest.fixture(scope="module")
def long_tail(shared_data: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(real folder with 6, 3 and 1 digits of classes 1, 4 and 7; synth folder with 4 kept images per class)."""
    root = tmp_path_factory.mktemp("long-tail")
    for cls, n in (("1", 6), ("4", 3), ("7", 1)):
        copy_classes(shared_data / "mnist", root / "real", 0, n, classes=(cls,))
    synthetic = write_fake_synth(shared_data / "mnist", root / "synth", classes=["1", "4", "7"], per_class=4,
                                 rejected_per_class=1, size=32)
    return root / "real", synthetic


def _balanced(long_tail, **options) -> tuple[ImageFolder, SyntheticImageFolder, MixedDataset]:
    real = ImageFolder(long_tail[0], **options)
    synthetic = SyntheticImageFolder(long_tail[1], class_to_idx=real.class_to_idx, **options)
    return real, synthetic, MixedDataset(real, synthetic, balance=True)


def _label(mixed: MixedDataset, i: int) -> int:
    return mixed.real.targets[i] if i < mixed.n_real else mixed.synthetic.targets[i - mixed.n_real]


def test_balance_fills_every_class_with_synthetic_images_before_real_repeats(long_tail):
    real, synthetic, mixed = _balanced(long_tail)  # real indices: class 1 -> 0-5, class 4 -> 6-8, class 7 -> 9
    sampler = MixedSampler(mixed, seed=0)
    assert mixed.per_class == 6 and len(sampler) == 18 and mixed.synthetic_per_epoch == 3 + 4
    assert mixed.ratio == pytest.approx(7 / 18)
    epochs = [list(sampler) for _ in range(4)]
    for epoch in epochs:
        assert len(epoch) == 18 and Counter(_label(mixed, i) for i in epoch) == {0: 6, 1: 6, 2: 6}
        drawn = [i - mixed.n_real for i in epoch if mixed.is_synthetic(i)]
        # Class 1 is full; class 4 takes 3 of its 4 synthetic images, class 7 all 4, none twice.
        assert Counter(synthetic.targets[s] for s in drawn) == {1: 3, 2: 4} and len(set(drawn)) == len(drawn)
        # Every real image once; only class 7's single image again, for the shortfall its synthetic ones leave.
        assert Counter(i for i in epoch if i < mixed.n_real) == {**{i: 1 for i in range(9)}, 9: 2}
    # Class 4's synthetic images take turns across epochs: 4 epochs × 3 draws = 3 each.
    turns = Counter(i for epoch in epochs for i in epoch if i >= mixed.n_real and _label(mixed, i) == 1)
    assert sorted(turns.values()) == [3, 3, 3, 3]
    assert epochs[0] != sorted(epochs[0]) and epochs[0] != epochs[1]  # shuffled, and anew each epoch


def test_balance_is_a_function_of_seed_and_epoch(long_tail):
    _, _, mixed = _balanced(long_tail)
    first = MixedSampler(mixed, seed=3)
    epochs = [list(first) for _ in range(3)]
    replay = MixedSampler(mixed, seed=3)
    assert list(replay) == epochs[0]
    replay.set_epoch(2)
    assert list(replay) == epochs[2]
    assert list(MixedSampler(mixed, seed=4)) != epochs[0]


def test_balanced_ranks_partition_the_epoch(long_tail):
    _, _, mixed = _balanced(long_tail)
    whole = MixedSampler(mixed, seed=2)
    whole.set_epoch(1)
    epoch = list(whole)
    ranks = [DistributedMixedSampler(mixed, num_replicas=4, rank=r, seed=2) for r in range(4)]
    for sampler in ranks:
        sampler.set_epoch(1)
    orders = [list(sampler) for sampler in ranks]
    assert all(len(order) == len(ranks[0]) == 5 for order in orders)  # ceil(18 / 4)
    # Disjoint slices of the one epoch, padded by 2 repeats as DistributedSampler pads.
    assert [orders[k % 4][k // 4] for k in range(20)] == epoch + epoch[:2]


def test_balanced_loader_batches_hold_every_class_equally(long_tail):
    _, _, mixed = _balanced(long_tail, transform=load_recipe("none"))
    x, y = next(iter(DataLoader(mixed, batch_size=18, sampler=MixedSampler(mixed, seed=0))))
    assert x.shape == (18, 3, 28, 28) and Counter(y.tolist()) == {0: 6, 1: 6, 2: 6}


def test_balance_without_synthetic_images_or_targets(long_tail):
    real = ImageFolder(long_tail[0])
    alone = MixedDataset(real, None, balance=True)  # real repeats only
    epoch = list(MixedSampler(alone, seed=0))
    assert Counter(real.targets[i] for i in epoch) == {0: 6, 1: 6, 2: 6} and epoch.count(9) == 6
    subset = MixedDataset(Subset(real, [0, 6, 7, 9]), None, balance=True)  # labels through the Subset
    assert subset.per_class == 2 and len(MixedSampler(subset)) == 6
    # A dataset without `targets` is read item by item.
    tensors = TensorDataset(torch.zeros(5, 1, 4, 4), torch.tensor([0, 0, 0, 1, 1]))
    assert Counter(int(tensors[i][1]) for i in MixedSampler(MixedDataset(tensors, None, balance=True))) == {0: 3, 1: 3}


def test_balance_errors_are_one_line(long_tail, shared_data, tmp_path):
    real, synthetic, _ = _balanced(long_tail)
    unconditional = SyntheticImageFolder(write_fake_synth(shared_data / "mnist", tmp_path / "u", classes=["1"],
                                                          per_class=2, conditional=False, size=32))
    tensors = TensorDataset(torch.zeros(4, 1, 32, 32), torch.tensor([0, 0, 1, 1]))
    cases = [
        (lambda: MixedDataset(real, synthetic, 0.25, balance=True), "leave ratio unset"),
        (lambda: MixedDataset(real, synthetic), "pass ratio"),
        (lambda: MixedDataset(real, synthetic, balance=1), "balance must be True or False"),
        (lambda: MixedDataset(real, unconditional, balance=True), "synthetic set is unlabeled"),
        (lambda: MixedDataset(tensors, unconditional, balance=True), "synthetic set is unlabeled"),
        (lambda: MixedDataset(unconditional, None, balance=True), "real set is unlabeled"),
        (lambda: MixedDataset([torch.zeros(1, 4, 4)] * 3, None, balance=True), "not (image, label) pairs"),
    ]
    for make, message in cases:
        with pytest.raises(UserError) as error:
            make()
        assert message in str(error.value) and "\n" not in str(error.value)
