"""The sampling pipeline: per-index latents, batch-invariant generation, encode/decode."""
from __future__ import annotations

import pytest
import torch

from augment_gan import sample
from augment_gan.checkpoint import load_checkpoint
from augment_gan.errors import UserError

pytest_plugins = ["fixtures_run"]  # tiny_run, uncond_run, digits100 (session-scoped, shared with test_synth)


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return load_checkpoint(tiny_run)


def test_latents_depend_only_on_seed_and_index():
    a = sample.latents(3, [0, 1, 2, 3, 4, 5], 16)
    b = sample.latents(3, [5, 2], 16)
    assert a.shape == (6, 16) and a.dtype == torch.float32
    assert torch.equal(b[0], a[5]) and torch.equal(b[1], a[2])
    assert not torch.equal(sample.latents(4, [2], 16)[0], a[2])      # the seed matters
    assert not torch.equal(a[0], a[1])                                # and the index
    big = sample.latents(0, range(2000), 64)                          # a standard normal prior
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02
    assert abs((big.abs() > 1.96).float().mean().item() - 0.05) < 0.005   # with normal tails
    corr = torch.corrcoef(big.T)                                      # independent coordinates
    assert (corr - torch.eye(64)).abs().max() < 0.1
    assert abs(torch.corrcoef(torch.stack([big[:-1, 0], big[1:, 0]]))[0, 1]) < 0.1  # and indices
    assert sample.latents(0, [7], 5).shape == (1, 5) and sample.latents(0, [], 5).shape == (0, 5)
    with pytest.raises(UserError):
        sample.latents(0, [-1], 4)


def test_latent_values_are_pinned_to_the_recorded_scheme():
    # synth records sample.LATENT_SCHEME so a folder never mixes two schemes: if this value changes, so must it.
    assert sample.LATENT_SCHEME.startswith("splitmix64")
    got = sample.latents(0, [0, 12345], 4)
    want = torch.tensor([[-0.5809909701347351, -1.0737438201904297, -1.2293076515197754, -0.1640164852142334],
                         [-0.4929741322994232, -0.19378569722175598, -0.6541761755943298, 1.295922040939331]])
    assert torch.allclose(got, want, atol=1e-6)


def test_generate_bytes_do_not_depend_on_batching(ckpt):
    indices = list(range(45))
    whole = sample.generate(ckpt, indices, seed=7)
    assert whole.dtype == torch.uint8 and whole.shape == (45, 1, 32, 32)
    # Odd chunks, single images and a shuffled order give the same bytes per index.
    parts = [sample.generate(ckpt, indices[a:b], seed=7) for a, b in ((0, 1), (1, 8), (8, 21), (21, 45))]
    assert torch.equal(torch.cat(parts), whole)
    order = [44, 3, 17, 0, 29]
    assert torch.equal(sample.generate(ckpt, order, seed=7), whole[order])
    assert not torch.equal(sample.generate(ckpt, indices, seed=8), whole)


def test_generate_labels_and_truncation(ckpt):
    default = sample.generate(ckpt, range(20), seed=0)
    explicit = sample.generate(ckpt, range(20), seed=0, labels=[i % 10 for i in range(20)])
    assert torch.equal(default, explicit)                             # balanced plan i % C by default
    relabeled = sample.generate(ckpt, range(20), seed=0, labels=[3] * 20)
    assert not torch.equal(default, relabeled)
    # psi = 0 puts every latent at the mean: one image per class.
    flat = sample.generate(ckpt, range(4), seed=0, labels=[2, 2, 2, 2], truncation=0.0)
    assert all(torch.equal(flat[0], flat[i]) for i in range(4))
    with pytest.raises(UserError, match="labels must be in"):
        sample.generate(ckpt, range(2), seed=0, labels=[0, 10])
    with pytest.raises(UserError, match="truncation"):
        sample.generate(ckpt, range(2), seed=0, truncation=-1)


def test_unconditional_takes_no_labels(uncond_run):
    ckpt = load_checkpoint(uncond_run)
    assert ckpt.num_classes == 0
    assert sample.generate(ckpt, range(3), seed=0).shape == (3, 1, 32, 32)
    with pytest.raises(UserError, match="unconditional"):
        sample.generate(ckpt, range(3), seed=0, labels=[0, 0, 0])


def test_encode_decode_round_trip_shapes(ckpt, digits100):
    from augment_gan.data import ReadOptions, read_image
    from augment_gan.pixels import hwc_to_nchw

    files = sorted(digits100.glob("*/*.png"))[:5]
    images = hwc_to_nchw(__import__("numpy").stack(
        [read_image(f, ReadOptions(resolution=32, channels="gray")) for f in files]))
    mu, logvar = sample.encode(ckpt, images)
    assert mu.shape == logvar.shape == (5, ckpt.z_dim)
    mu1, _ = sample.encode(ckpt, images[2:3])
    assert torch.equal(mu1[0], mu[2])                                  # batch-invariant too
    out = sample.decode(ckpt, mu, [0] * 5)
    assert out.shape == (5, 1, 32, 32) and out.dtype == torch.uint8
    with pytest.raises(UserError, match="class-conditional"):
        sample.decode(ckpt, mu)
    with pytest.raises(UserError, match="needs"):
        sample.encode(ckpt, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
