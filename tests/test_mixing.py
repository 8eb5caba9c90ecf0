"""One image size out of MixedDataset: 28 px real digits (examples/digits) with 32 px synthetic ones."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from augment_gan import GeneratorDataset, MixedDataset, MixedSampler, SyntheticImageFolder, load_recipe
from augment_gan.errors import UserError
from fakesynth import write_fake_synth, write_tiny_checkpoint

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
