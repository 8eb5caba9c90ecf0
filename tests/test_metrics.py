"""Metrics move the right way on controlled cases built from real MNIST digits, and the classifier learns."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from augment_gan import features as extractors
from augment_gan import metrics
from augment_gan.errors import UserError
from fakesynth import copy_classes


@pytest.fixture(autouse=True)
def _one_thread():
    # Five agents share two cores here; several torch threads per process thrash (10× slower).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def digits(shared_data, tmp_path_factory):
    """Two disjoint sets of 200 real digits (20 per class) at 32px: (a, b) ImageSets."""
    from augment_gan.data import ReadOptions, load_folder

    root = tmp_path_factory.mktemp("digits")
    a = copy_classes(shared_data / "mnist", root / "a", 0, 20)
    b = copy_classes(shared_data / "mnist", root / "b", 20, 40)
    options = ReadOptions(resolution=32)
    return load_folder(a, options, progress=False), load_folder(b, options, progress=False)


@pytest.fixture(scope="module")
def features(digits):
    """Random-CNN features (fast, fixed seed) of set a, set b, and uniform noise images."""
    a, b = digits
    torch.set_num_threads(1)
    extractor = extractors.random_extractor(1, seed=0)
    noise = np.random.default_rng(0).integers(0, 256, size=np.asarray(b.images).shape, dtype=np.uint8)
    return extractor(np.asarray(a.images)), extractor(np.asarray(b.images)), extractor(noise)


def test_identical_sets_score_as_identical(features):
    a, _, noise = features
    assert metrics.frechet_distance(a, a) < 1e-6
    kid_self, _ = metrics.kernel_distance(a, a)
    kid_noise, _ = metrics.kernel_distance(a, noise)
    # Unbiased MMD² of a set against itself is slightly negative (the diagonal is excluded only once).
    assert abs(kid_self) < 1e-3 * kid_noise
    prdc = metrics.precision_recall_density_coverage(a, a)
    assert prdc["precision"] == prdc["recall"] == prdc["coverage"] == 1.0
    assert prdc["density"] >= 1.0  # every sample sits in its own ball and its neighbours'


def test_noise_is_far_and_fresh_digits_are_close(features):
    a, b, noise = features
    fd_digits, fd_noise = metrics.frechet_distance(a, b), metrics.frechet_distance(a, noise)
    assert fd_noise > 20 * fd_digits
    assert metrics.kernel_distance(a, noise)[0] > 20 * metrics.kernel_distance(a, b)[0]
    far = metrics.precision_recall_density_coverage(a, noise)
    near = metrics.precision_recall_density_coverage(a, b)
    assert far["precision"] < 0.05 and far["coverage"] < 0.05
    assert near["precision"] > 0.5 and near["recall"] > 0.5 and near["coverage"] > 0.5


def test_precision_and_recall_are_not_swapped():
    # A collapsed generator: every synthetic point near the centre of the real cloud. All synthetic
    # points are realistic (precision ≈ 1) but they miss most of the real variety (recall, coverage low).
    rng = np.random.default_rng(0)
    real = rng.normal(size=(600, 2)).astype(np.float32)
    collapsed = (0.1 * rng.normal(size=(600, 2))).astype(np.float32)
    prdc = metrics.precision_recall_density_coverage(real, collapsed)
    assert prdc["precision"] > 0.95
    assert prdc["recall"] < 0.3 and prdc["coverage"] < 0.3


def test_memorisation_flags_copies_but_not_fresh_samples(features):
    a, b, _ = features
    copies = metrics.memorisation(a, a[:100])
    assert copies.share == 1.0
    assert (copies.nearest == np.arange(100)).all()
    fresh = metrics.memorisation(a, b)
    assert fresh.share < 0.1  # ≈ 1% expected: the threshold is the real set's 1st percentile
    mixed = metrics.memorisation(a, np.concatenate([a[:50], b[:150]]))
    assert mixed.flagged[:50].all() and mixed.flagged[50:].mean() < 0.1


def test_kid_subset_size_adapts_to_small_sets(features):
    a, b, _ = features
    assert metrics.kid_subset_size(5000, 3000) == 1000
    assert metrics.kid_subset_size(200, 37) == 37
    mean, std = metrics.kernel_distance(a, b[:37])
    assert np.isfinite(mean) and std >= 0
    # Same seed, same subsets: the result is reproducible.
    assert metrics.kernel_distance(a, b[:37], seed=3) == metrics.kernel_distance(a, b[:37], seed=3)


def test_bad_inputs_are_clear_errors(features):
    a, _, _ = features
    with pytest.raises(ValueError, match="N×F"):
        metrics.frechet_distance(a[0], a)
    with pytest.raises(UserError, match="more than k=5"):
        metrics.precision_recall_density_coverage(a, a[:5])
    bad = a.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(a, bad)


def test_linear_probe_reads_separable_features_and_not_random_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    centres = rng.normal(scale=4.0, size=(4, 16))
    x = (centres[labels] + rng.normal(size=(400, 16))).astype(np.float32)
    assert metrics.linear_probe(x[:300], labels[:300], x[300:], labels[300:]) > 0.95
    shuffled = rng.permutation(labels)
    assert metrics.linear_probe(x[:300], shuffled[:300], x[300:], shuffled[300:]) < 0.5


def test_inception_never_downloads(tmp_path):
    with pytest.raises(UserError, match="not found"):
        extractors.inception_extractor(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(UserError):  # torch-fidelity missing, or the file refused: never a download
        extractors.inception_extractor(junk)


def test_classifier_learns_digits_and_is_deterministic(digits):
    from augment_gan.classifier import accuracy, stratified_split, train_classifier

    a, b = digits
    x, y = np.asarray(a.images), a.labels
    model = train_classifier(x, y, steps=120, seed=0)
    acc = accuracy(model, np.asarray(b.images), b.labels)
    assert acc > 0.5  # 10 classes: chance is 0.1
    again = train_classifier(x, y, steps=5, seed=1)
    twice = train_classifier(x, y, steps=5, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(again.state_dict().values(), twice.state_dict().values()))
    assert model.features(torch.zeros(3, 1, 32, 32)).shape == (3, model.feature_dim)

    tr, te = stratified_split(y, 0.3, seed=0)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    assert (np.bincount(y[te], minlength=10) == 6).all()


def test_classifier_mixes_extra_images_and_checks_shapes(digits):
    from augment_gan.classifier import train_classifier
    from augment_gan.recipes import load_recipe

    a, b = digits
    x, y = np.asarray(a.images), a.labels
    model = train_classifier(x, y, steps=3, seed=0, extra=(np.asarray(b.images), b.labels),
                             synthetic_ratio=0.5, recipe=load_recipe("standard"))
    assert model.num_classes == 10
    with pytest.raises(UserError, match="H×W×C"):
        train_classifier(x, y, steps=1, extra=(np.repeat(np.asarray(b.images), 3, axis=3), b.labels))
    with pytest.raises(UserError, match="labels"):
        train_classifier(x, y[:10], steps=1)
    with pytest.raises(UserError, match="schedule"):
        train_classifier(x, y, steps=1, extra=(np.asarray(b.images), b.labels), synthetic_schedule="cosine")
    with pytest.raises(UserError, match="real finish"):
        train_classifier(x, y, steps=1, extra=(np.asarray(b.images), b.labels), real_finish=1.0)


def test_synthetic_schedules_set_the_synthetic_images_per_step():
    from augment_gan.classifier import synthetic_count

    assert [synthetic_count(s, 10, 16, "constant", 0.0) for s in range(10)] == [16] * 10
    assert [synthetic_count(s, 10, 16, "constant", 0.3) for s in range(10)] == [16] * 7 + [0] * 3
    linear = [synthetic_count(s, 10, 16, "linear", 0.2) for s in range(10)]
    assert linear[0] == 16 and linear[7] == 2 and linear[8:] == [0, 0]
    assert all(a >= b for a, b in zip(linear, linear[1:]))


def test_real_finish_trains_the_last_steps_on_real_images_only(digits, monkeypatch):
    from augment_gan import classifier

    a, b = digits
    x, y = np.asarray(a.images), a.labels
    synthetic = np.full_like(np.asarray(b.images), 255)  # all-white: recognisable in a batch
    seen = []
    real_forward = classifier.SmallCNN.forward

    def spy(self, batch):
        seen.append(int((batch.flatten(1).min(dim=1).values == 1.0).sum()))
        return real_forward(self, batch)

    monkeypatch.setattr(classifier.SmallCNN, "forward", spy)
    classifier.train_classifier(x, y, steps=8, batch_size=8, seed=0, extra=(synthetic, b.labels),
                                synthetic_ratio=0.5, real_finish=0.25)
    assert seen == [4] * 6 + [0, 0]


def test_every_feature_space_has_one_interface(digits, tmp_path):
    # uint8 N×H×W×C in, float32 N×dim out, with a name; `embed` is the same map on N×C×H×W tensors.
    from augment_gan.checkpoint import load_checkpoint
    from augment_gan.pixels import hwc_to_nchw, to_float
    from fakesynth import write_tiny_checkpoint

    a, _ = digits
    images = np.asarray(a.images)[:12]  # 32 px gray
    checkpoint = write_tiny_checkpoint(tmp_path / "run", [str(i) for i in range(10)])
    spaces = [extractors.random_extractor(1), extractors.classifier_extractor(images, a.labels[:12], steps=2),
              extractors.pixel_extractor(channels=1), extractors.discriminator_extractor(checkpoint)]
    for extractor in spaces:
        f = extractor(images, batch_size=5)
        assert f.dtype == np.float32 and f.shape == (12, extractor.dim) and extractor.name
        with torch.inference_mode():
            assert np.allclose(extractor.embed(hwc_to_nchw(images)).numpy(), f, atol=1e-5)
    d = load_checkpoint(checkpoint).D.eval()
    with torch.inference_mode():
        assert np.allclose(spaces[3](images), d.features(to_float(hwc_to_nchw(images))).numpy(), atol=1e-5)


def test_pixel_features_measure_the_rms_difference_of_area_downsampled_images(digits):
    a, _ = digits
    pixels = extractors.pixel_extractor(16)
    black, white = np.zeros((1, 32, 32, 1), np.uint8), np.full((1, 32, 32, 1), 255, np.uint8)
    f = pixels(np.concatenate([black, white]))
    assert f.shape == (2, 256) and pixels.dim is None  # no channel count given
    assert np.linalg.norm(f[0] - f[1]) == pytest.approx(2.0)  # -1 vs +1 everywhere
    image = np.asarray(a.images)[:1]
    blocks = image[0, :, :, 0].astype(np.float64).reshape(16, 2, 16, 2).mean(axis=(1, 3)) / 127.5 - 1
    assert np.allclose(pixels(image)[0], blocks.ravel() / 16, atol=1e-6)  # 2×2 area means, scaled by 1/√256
    with pytest.raises(UserError, match="positive integer"):
        extractors.pixel_extractor(0)
