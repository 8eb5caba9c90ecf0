"""Memory that does not grow with the folder: decoding streams into the cache file in a bounded worker pool,
the loaded set is a memory map of it, and fit reads its batches from that map."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from augment_gan import decode
from augment_gan.data import ReadOptions, load_folder, read_image
from augment_gan.pixels import hwc_to_nchw
from augment_gan.trainset import MappedImages, images_on


@pytest.fixture()
def gray_then_colour(tmp_path, shared_data) -> Path:
    """40 gray digits sorted before one colour emoji: "auto" decides RGB only at the last file."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k, f in enumerate(sorted((shared_data / "mnist" / "3").iterdir())[:40]):
        shutil.copy(f, folder / f"a{k:02d}.png")
    shutil.copy(next(iter(sorted((shared_data / "emoji-twitter" / "flags").iterdir()))), folder / "z.png")
    return folder


@pytest.mark.parametrize("workers", [1, 2])
def test_first_decode_streams_into_a_memory_map(gray_then_colour, tmp_path, workers):
    cached = load_folder(gray_then_colour, ReadOptions(resolution=16), cache_dir=tmp_path / "c", workers=workers,
                         progress=False)
    assert not cached.from_cache and isinstance(cached.images, np.memmap) and not cached.images.flags.writeable
    assert cached.images.shape == (41, 16, 16, 3) and cached.channels == 3 and cached.colour == 1
    # The gray images written before the colour one were widened in place: gray repeated in 3 channels.
    expected = np.stack([read_image(gray_then_colour / f, ReadOptions(resolution=16, channels="rgb"))
                         for f in cached.files])
    assert np.array_equal(cached.images, expected)
    plain = load_folder(gray_then_colour, ReadOptions(resolution=16), use_cache=False, workers=workers,
                        progress=False)
    assert plain.images.flags.writeable and np.array_equal(plain.images, expected)
    again = load_folder(gray_then_colour, ReadOptions(resolution=16), cache_dir=tmp_path / "c", progress=False)
    assert again.from_cache and np.array_equal(again.images, expected)
    gray = load_folder(gray_then_colour, ReadOptions(resolution=16, channels="gray"), cache_dir=tmp_path / "c",
                       progress=False)
    assert gray.images.shape == (41, 16, 16, 1)


def test_the_worker_pool_decodes_a_bounded_number_ahead(tmp_path, shared_data, monkeypatch):
    files = sorted((shared_data / "mnist" / "7").iterdir())[:400]
    ahead = []

    class Counting(decode.ProcessPoolExecutor):
        submitted = 0

        def submit(self, *args, **kwargs):
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(decode, "ProcessPoolExecutor", Counting)
    results = decode.iter_decoded(files[0].parent, [f.name for f in files], [f.stat().st_size for f in files],
                                  ReadOptions(resolution=8), workers=2, progress=False)
    for i, result in enumerate(results):
        assert not isinstance(result, str)
        ahead.append(Counting.submitted - i // decode._POOL_CHUNK)
    assert i == 399 and max(ahead) <= decode._POOL_AHEAD * 2 + 1


def test_fit_indexes_batches_from_the_map(gray_then_colour, tmp_path):
    data = load_folder(gray_then_colour, ReadOptions(resolution=16), cache_dir=tmp_path, progress=False).images
    images = images_on(torch.device("cpu"), data)
    assert isinstance(images, MappedImages) and len(images) == 41
    idx = torch.tensor([40, 3, 3, 0])
    batch = images[idx.to(images.device)]  # how the loop indexes it
    assert batch.dtype == torch.uint8 and batch.is_contiguous()
    assert torch.equal(batch, hwc_to_nchw(np.asarray(data))[idx])
    Image.fromarray(batch[0].permute(1, 2, 0).numpy())  # a real N×C×H×W uint8 batch
