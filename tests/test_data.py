"""The image-folder reader and its cache, on real images and on the generated bad-file corpus."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from augment_gan.data import (
    ImageSet,
    ReadOptions,
    default_cache_dir,
    load_folder,
    read_image,
    scan_folder,
)
from augment_gan.errors import UserError
from badfiles import SIZE, write_bad_corpus


def _subset(source: Path, dest: Path, per_class: int, classes: list[str] | None = None) -> Path:
    """Copy the first `per_class` files of each class folder (a real, fast-to-decode subset)."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        if classes is not None and class_dir.name not in classes:
            continue
        (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
        for file in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy2(file, dest / class_dir.name / file.name)
    return dest


def _load(folder: Path, cache: Path, **options) -> ImageSet:
    return load_folder(folder, ReadOptions(**options), cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_bad_corpus(folder)


# --- The bad-file corpus. ---------------------------------------------------------------------


def test_bad_files_are_skipped_and_named_good_files_load(corpus, tmp_path, caplog):
    folder, expected = corpus
    dataset = _load(folder, tmp_path, resolution=SIZE)
    skipped = dict(dataset.skipped)
    assert set(skipped) == {name for name, e in expected.items() if e.kind == "skip"}
    for name, reason in skipped.items():
        assert expected[name].reason in reason.lower(), (name, reason)
    assert set(dataset.files) == {name for name, e in expected.items() if e.kind == "ok"}
    assert dataset.labels is None and dataset.classes == [] and dataset.layout == "flat"
    assert dataset.ignored == 2  # README.txt and labels.csv; hidden files are not even counted
    # One warning per skipped file, naming it, plus one summary line.
    err = [r.getMessage() for r in caplog.records if r.name.startswith("augment_gan") and r.levelname == "WARNING"]
    assert len(err) == len(skipped) + 1
    for name in skipped:
        assert sum(name in line for line in err) == 1


def test_good_files_decode_to_the_expected_pixels(corpus, tmp_path):
    folder, expected = corpus
    dataset = _load(folder, tmp_path, resolution=SIZE)
    assert dataset.channels == 3  # the corpus mixes gray and colour images
    assert dataset.images.shape == (len(dataset.files), SIZE, SIZE, 3) and dataset.images.dtype == np.uint8
    for name, pixels in zip(dataset.files, dataset.images):
        want = expected[name]
        error = np.abs(pixels.astype(np.int16) - want.pixels).mean()
        assert error <= want.tolerance, f"{name}: mean abs error {error:.2f} > {want.tolerance}"


def test_exif_rotation_and_transparency_are_applied(corpus):
    folder, _ = corpus
    rotated = read_image(folder / "exif-rotated.jpg", ReadOptions(resolution=SIZE))
    # Stored red-top/blue-bottom with orientation 6 -> displayed blue-left/red-right.
    left, right = rotated[:, : SIZE // 2 - 2].mean((0, 1)), rotated[:, SIZE // 2 + 2 :].mean((0, 1))
    assert left[2] > 200 and left[0] < 50 and right[0] > 200 and right[2] < 50
    # Palette PNG: the transparent index shows the background, white by default, black on request.
    white = read_image(folder / "palette-transparent.png", ReadOptions(resolution=SIZE))
    black = read_image(folder / "palette-transparent.png", ReadOptions(resolution=SIZE, background=(0, 0, 0)))
    assert (white[:, : SIZE // 2] == 255).all() and (black[:, : SIZE // 2] == 0).all()
    assert (white[:, SIZE // 2 :] == (0, 0, 255)).all()


def test_read_image_gray_and_errors(corpus):
    folder, expected = corpus
    gray16 = read_image(folder / "gray16.png", ReadOptions(resolution=SIZE))
    assert gray16.shape == (SIZE, SIZE, 1)  # a gray image alone is one channel under "auto"
    assert np.array_equal(gray16[..., 0], expected["gray16.png"].pixels[..., 0])
    for name, want in expected.items():
        if want.kind == "skip":
            with pytest.raises(UserError, match="cannot decode"):
                read_image(folder / name, ReadOptions(resolution=SIZE))


def test_pixel_limit_is_per_call_and_leaves_pillow_alone(corpus, tmp_path):
    folder, _ = corpus
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any DecompressionBombWarning would fail the test
        with pytest.raises(UserError, match="max_pixels"):
            read_image(folder / "bomb.png")
        # A 32×32 image is over a 1,000-pixel limit and under a 2,000-pixel one.
        with pytest.raises(UserError, match="max_pixels"):
            read_image(folder / "rgb.png", ReadOptions(resolution=SIZE, max_pixels=1000))
        assert read_image(folder / "rgb.png", ReadOptions(resolution=SIZE, max_pixels=2000)).shape == (SIZE, SIZE, 3)
    assert Image.MAX_IMAGE_PIXELS == before


# --- Real images. -------------------------------------------------------------------------------


def test_mnist_subset_is_grayscale_with_labels(shared_data, tmp_path):
    folder = _subset(shared_data / "mnist", tmp_path / "mnist", per_class=8)
    dataset = _load(folder, tmp_path / "cache", resolution=32)
    assert dataset.channels == 1 and dataset.images.shape == (80, 32, 32, 1)
    assert dataset.classes == [str(d) for d in range(10)]
    assert [dataset.classes[label] for label in dataset.labels] == [f.split("/")[0] for f in dataset.files]
    # Digits are white on black: the border is dark, the centre bright somewhere.
    assert dataset.images[:, :2].mean() < 10 and dataset.images[:, 8:24, 8:24].max(axis=(1, 2, 3)).min() > 200
    # The pool and the single-file path produce the same pixels.
    assert np.array_equal(dataset.images[17], read_image(folder / dataset.files[17], ReadOptions(resolution=32)))


def test_emoji_subset_is_rgb_composited_over_the_background(shared_data, tmp_path):
    folder = _subset(shared_data / "emoji-twitter", tmp_path / "emoji", per_class=5)
    white = _load(folder, tmp_path / "cache", resolution=64)
    black = _load(folder, tmp_path / "cache", resolution=64, background=(0, 0, 0))
    assert white.channels == 3 and white.images.shape == (45, 64, 64, 3) and len(white.classes) == 9
    # Pixels whose source alpha is 0 must be exactly the background.
    for i, name in enumerate(white.files[:10]):
        alpha = np.asarray(Image.open(folder / name).convert("RGBA"))[..., 3]
        assert (alpha == 0).any(), name
        assert (white.images[i][alpha == 0] == 255).all() and (black.images[i][alpha == 0] == 0).all()
    # Palette images (172 in the full set) decode like the RGBA ones: the check above covers both
    # whenever the subset holds one; make sure at least the modes are what the README says.
    assert {Image.open(folder / f).mode for f in white.files} <= {"RGBA", "P"}


def test_workers_give_the_same_pixels_as_one_process(shared_data, tmp_path):
    folder = _subset(shared_data / "emoji-twitter", tmp_path / "emoji", per_class=5)
    pooled = load_folder(folder, ReadOptions(resolution=32), workers=2, use_cache=False, progress=False)
    single = load_folder(folder, ReadOptions(resolution=32), workers=1, use_cache=False, progress=False)
    assert len(pooled) == 45  # >= the pool threshold, so the pool really ran
    assert np.array_equal(pooled.images, single.images) and pooled.files == single.files


def test_class_names_sort_like_torchvision(shared_data, tmp_path):
    source = sorted((shared_data / "mnist" / "3").iterdir())[:2]
    for name in ["b", "B", "10", "9", "a_b", "a-b"]:
        (tmp_path / name / "deeper").mkdir(parents=True)
        shutil.copy2(source[0], tmp_path / name / "x.png")
        shutil.copy2(source[1], tmp_path / name / "deeper" / "y.png")  # nested files belong to the class
    (tmp_path / "not-a-class").mkdir()  # no image inside: not a class
    (tmp_path / "notes.txt").write_text("top-level non-image files do not break the layout")
    scan = scan_folder(tmp_path)
    # What torchvision.datasets.folder.find_classes returns for these names (checked with
    # torchvision 0.29; importing it here would cost ~10 s on a loaded CI core): plain code-point order.
    assert scan.layout == "classes" and scan.classes == ["10", "9", "B", "a-b", "a_b", "b"]
    assert len(scan.files) == 12 and all(scan.classes[l] == f.split("/")[0] for l, f in zip(scan.labels, scan.files))


def test_symlinked_class_folders_are_followed_without_cycles(shared_data, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for file in sorted((shared_data / "mnist" / "4").iterdir())[:3]:
        shutil.copy2(file, elsewhere / file.name)
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    shutil.copy2(elsewhere / sorted(os.listdir(elsewhere))[0], root / "real" / "one.png")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "real" / "loop").symlink_to(root, target_is_directory=True)  # a cycle back to the root
    scan = scan_folder(root)
    assert scan.classes == ["linked", "real"] and len(scan.files) == 4


def test_flat_and_mixed_folders_are_unlabeled(shared_data, tmp_path, caplog):
    digit = sorted((shared_data / "mnist" / "7").iterdir())[0]
    (tmp_path / "flat").mkdir()
    shutil.copy2(digit, tmp_path / "flat" / "a.png")
    assert scan_folder(tmp_path / "flat").layout == "flat"
    (tmp_path / "mixed" / "seven").mkdir(parents=True)
    shutil.copy2(digit, tmp_path / "mixed" / "top.png")
    shutil.copy2(digit, tmp_path / "mixed" / "seven" / "inner.png")
    dataset = _load(tmp_path / "mixed", tmp_path / "cache", resolution=32)
    assert dataset.layout == "mixed" and dataset.labels is None and dataset.classes == [] and len(dataset) == 2
    assert "unlabeled" in caplog.text


def test_fit_modes_on_a_wide_image(tmp_path):
    # 96×32: red | green | blue thirds. Crop keeps green; pad adds background above and below;
    # resize squeezes all three colours in.
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, :32, 0] = wide[:, 32:64, 1] = wide[:, 64:, 2] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    crop = read_image(tmp_path / "wide.png", ReadOptions(resolution=32, fit="center-crop"))
    pad = read_image(tmp_path / "wide.png", ReadOptions(resolution=32, fit="pad", background=(0, 0, 0)))
    resize = read_image(tmp_path / "wide.png", ReadOptions(resolution=32, fit="resize"))
    assert (crop == (0, 255, 0)).all()
    assert (pad[:8] == 0).all() and (pad[-8:] == 0).all() and pad[16, 16, 1] > 250
    assert resize[16, 2, 0] > 250 and resize[16, 16, 1] > 250 and resize[16, 29, 2] > 250


def test_forced_channels(corpus, tmp_path):
    folder, _ = corpus
    gray = _load(folder, tmp_path, resolution=SIZE, channels="gray")
    assert gray.channels == 1 and gray.images.shape[-1] == 1
    rgb_only_gray = read_image(folder / "mode1.png", ReadOptions(resolution=SIZE, channels="rgb"))
    assert rgb_only_gray.shape == (SIZE, SIZE, 3)


# --- The cache. ---------------------------------------------------------------------------------


def test_second_load_is_a_read_only_memmap_of_the_same_pixels(shared_data, tmp_path):
    folder = _subset(shared_data / "mnist", tmp_path / "mnist", per_class=3)
    first = _load(folder, tmp_path / "cache", resolution=32)
    second = _load(folder, tmp_path / "cache", resolution=32)
    assert not first.from_cache and second.from_cache
    assert isinstance(second.images, np.memmap) and not second.images.flags.writeable
    assert np.array_equal(first.images, second.images)
    assert second.files == first.files and np.array_equal(second.labels, first.labels)
    assert second.classes == first.classes and second.channels == first.channels == 1
    # Other options are another entry; both coexist.
    other = _load(folder, tmp_path / "cache", resolution=16)
    assert not other.from_cache and len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_changed_added_removed_files_invalidate_the_cache(shared_data, tmp_path):
    folder = _subset(shared_data / "mnist", tmp_path / "mnist", per_class=3)
    cache = tmp_path / "cache"
    base = _load(folder, cache, resolution=32)
    index = base.files.index("0/" + sorted(os.listdir(folder / "0"))[0])

    # Changed: same name, different pixels (an inverted digit).
    target = folder / base.files[index]
    Image.fromarray(255 - np.asarray(Image.open(target))).save(target)
    changed = _load(folder, cache, resolution=32)
    assert not changed.from_cache
    assert abs(int(changed.images[index].mean()) - (255 - int(base.images[index].mean()))) <= 2
    assert len(list(cache.glob("*.npy"))) == 1  # the stale entry was replaced, not kept

    # Added.
    shutil.copy2(folder / base.files[-1], folder / "9" / "extra.png")
    added = _load(folder, cache, resolution=32)
    assert not added.from_cache and len(added) == len(base) + 1 and "9/extra.png" in added.files

    # Removed.
    (folder / base.files[0]).unlink()
    removed = _load(folder, cache, resolution=32)
    assert not removed.from_cache and len(removed) == len(base) and base.files[0] not in removed.files
    assert _load(folder, cache, resolution=32).from_cache


def test_cache_dir_defaults_and_override(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("AUGMENT_GAN_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    folder, _ = corpus
    dataset = load_folder(folder, ReadOptions(resolution=SIZE), progress=False)
    assert dataset.cache_file.parent == tmp_path / "env-cache"
    monkeypatch.delenv("AUGMENT_GAN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "augment-gan"


def test_a_corrupt_cache_entry_is_re_decoded(corpus, tmp_path):
    folder, _ = corpus
    first = _load(folder, tmp_path, resolution=SIZE)
    expected = np.array(first.images)  # first.images maps the file about to be cut short in place
    first.cache_file.write_bytes(b"garbage")
    again = _load(folder, tmp_path, resolution=SIZE)
    assert not again.from_cache and np.array_equal(again.images, expected)


# --- Errors. --------------------------------------------------------------------------------------


def test_missing_empty_and_undecodable_folders_are_user_errors(tmp_path, corpus):
    with pytest.raises(UserError, match="folder not found"):
        load_folder(tmp_path / "nope", progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no image files"):
        load_folder(tmp_path / "empty", progress=False)
    folder, _ = corpus
    (tmp_path / "bad").mkdir()
    shutil.copy2(folder / "truncated.png", tmp_path / "bad" / "truncated.png")
    with pytest.raises(UserError, match="no decodable image.*truncated"):
        load_folder(tmp_path / "bad", cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize(
    "bad",
    [dict(resolution=48), dict(resolution=512), dict(fit="stretch"), dict(channels="bgr"),
     dict(background=(0, 0)), dict(background=(0, 0, 256)), dict(max_pixels=0)],
)
def test_read_options_are_validated(bad):
    with pytest.raises(UserError):
        ReadOptions(**bad)


def test_read_options_normalise_background():
    assert ReadOptions(background=[1, 2, 3]) == ReadOptions(background=(1, 2, 3))
