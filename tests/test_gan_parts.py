"""Unit tests of the GAN's parts: losses, self-supervised constraints, DiffAugment, networks, checkpoints."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from augment_gan import diffaug, losses, selfsup
from augment_gan.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from augment_gan.runmeta import RunMeta
from augment_gan.config import TrainConfig
from augment_gan.errors import UserError
from augment_gan.models import GlobalBatchNorm2d, Generator, build_networks


# -- losses -------------------------------------------------------------------------------------------

def test_hinge_losses_match_their_definition():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert losses.d_loss(real, fake, "hinge").item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert losses.g_loss(fake, "hinge").item() == pytest.approx(1.0)


def test_nonsaturating_losses_fall_as_d_gets_it_right():
    good = losses.d_loss(torch.full((4,), 5.0), torch.full((4,), -5.0), "nonsaturating")
    bad = losses.d_loss(torch.full((4,), -5.0), torch.full((4,), 5.0), "nonsaturating")
    assert good < 0.02 < 4 < bad
    assert losses.g_loss(torch.full((4,), 5.0), "nonsaturating") < losses.g_loss(torch.zeros(4), "nonsaturating")


def test_r1_penalty_is_squared_gradient_norm():
    x = torch.randn(3, 1, 2, 2, requires_grad=True)
    logits = (2.0 * x).flatten(1).sum(1)               # gradient is 2 everywhere: ‖∇‖² = 4 × 4 pixels
    assert losses.r1_penalty(logits, x).item() == pytest.approx(16.0)


# -- self-supervision ----------------------------------------------------------------------------------

def test_mode_seeking_loss_punishes_pairs_that_look_alike():
    z = torch.randn(4, 8)
    same = torch.randn(2, 1, 4, 4).repeat_interleave(2, dim=0)      # rows 0=1 and 2=3: collapsed
    different = torch.randn(4, 1, 4, 4)
    assert losses.mode_seeking_loss(same, z) > 1e4                   # 1 / eps
    assert losses.mode_seeking_loss(different, z) < 10
    # Twice the image distance for the same latent distance halves the loss.
    assert float(losses.mode_seeking_loss(2 * different, z)) == pytest.approx(float(losses.mode_seeking_loss(different, z)) / 2, rel=1e-3)
    with pytest.raises(ValueError, match="even"):
        losses.mode_seeking_loss(different[:3], z[:3])


def test_rotate_matches_rot90_per_sample():
    x = torch.randn(4, 2, 5, 5)
    k = torch.tensor([0, 1, 2, 3])
    out = selfsup.rotate(x, k)
    for i in range(4):
        assert torch.equal(out[i], torch.rot90(x[i], i, dims=(1, 2)))


def test_rotation_loss_is_low_for_right_answers_and_high_for_wrong():
    k = torch.tensor([0, 1, 2, 3])
    right = torch.nn.functional.one_hot(k, 4).float() * 20
    wrong = torch.nn.functional.one_hot((k + 1) % 4, 4).float() * 20
    assert selfsup.rotation_loss(right, k) < 1e-3
    assert selfsup.rotation_loss(wrong, k) > 10


def test_masks_cover_a_quarter_and_completion_counts_only_the_hole():
    g = torch.Generator().manual_seed(0)
    masks = selfsup.draw_masks(8, 32, g)
    assert masks.shape == (8, 1, 32, 32)
    assert (masks.float().mean(dim=(1, 2, 3)) == 0.25).all()
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    masked = selfsup.mask_images(x, masks)
    assert (masked[masks.expand_as(x)] == 0).all() and torch.equal(masked[~masks.expand_as(x)], x[~masks.expand_as(x)])
    assert selfsup.completion_loss(x, x, masks) == 0
    outside_wrong = torch.where(masks.expand_as(x), x, -x)            # errors only outside the hole
    assert selfsup.completion_loss(outside_wrong, x, masks) == 0
    inside_off = torch.where(masks.expand_as(x), x + 1, x)            # error 1 on every hole pixel
    assert selfsup.completion_loss(inside_off, x, masks).item() == pytest.approx(0.5)
    # A lower-resolution reconstruction is compared with the downsampled image.
    small = torch.nn.functional.adaptive_avg_pool2d(x, 16)
    assert selfsup.completion_loss(small, x, masks).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    mu, logvar = torch.zeros(2, 8), torch.zeros(2, 8)
    assert selfsup.kl_divergence(mu, logvar) == 0
    assert selfsup.kl_divergence(mu + 1, logvar) == pytest.approx(4.0)  # ½·Σ 1 over 8 dims


def test_encoder_loss_is_zero_for_perfect_inversion():
    x, z = torch.randn(2, 1, 8, 8), torch.randn(2, 4)
    zero = selfsup.encoder_loss(x, x, torch.zeros(2, 4), torch.zeros(2, 4), z, z, kl_weight=1.0)
    assert zero == 0
    assert selfsup.encoder_loss(x + 1, x, torch.zeros(2, 4), torch.zeros(2, 4), z, z, 1.0) > 0


# -- DiffAugment ---------------------------------------------------------------------------------------

def _params(n, p, ops=("color", "translation", "cutout"), seed=0):
    return diffaug.draw(n, p, tuple(ops), torch.Generator().manual_seed(seed))


def test_p_zero_is_identity_and_p_one_changes_every_image():
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    assert torch.equal(diffaug.apply(x, _params(6, 0.0)), x)
    out = diffaug.apply(x, _params(6, 1.0))
    assert all(not torch.equal(out[i], x[i]) for i in range(6))


def test_randomness_does_not_depend_on_p():
    a, b = _params(5, 0.1, seed=3), _params(5, 0.9, seed=3)
    assert torch.equal(a["shift"], b["shift"]) and torch.equal(a["cutout_center"], b["cutout_center"])


def test_translation_is_an_exact_integer_shift_with_zero_fill():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    params = {"translation_on": torch.tensor([True]), "shift": torch.tensor([[1.0, -1.0]])}  # +1 row, -1 col
    out = diffaug.apply(x, params)
    assert torch.equal(out[0, 0, 1:, :-1], x[0, 0, :-1, 1:])
    assert (out[0, 0, 0] == 0).all() and (out[0, 0, :, -1] == 0).all()


def test_cutout_zeroes_a_quarter():
    x = torch.ones(4, 1, 16, 16)
    out = diffaug.apply(x, diffaug.draw(4, 1.0, ("cutout",), torch.Generator().manual_seed(1)))
    assert ((out == 0).float().mean(dim=(1, 2, 3)) <= 0.25).all()
    assert ((out == 0).float().mean() > 0.1)


def test_augmentation_is_differentiable_and_sliceable():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    params = _params(4, 1.0)
    diffaug.apply(x, params).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    whole = diffaug.apply(x.detach(), params)
    halves = torch.cat([diffaug.apply(x.detach()[:2], diffaug.slice_params(params, 0, 2)),
                        diffaug.apply(x.detach()[2:], diffaug.slice_params(params, 2, 4))])
    assert torch.allclose(whole, halves, atol=1e-6)


def test_adaptive_p_rises_when_d_overfits_and_falls_otherwise():
    ada = diffaug.AdaptiveP(target=0.6, ada_kimg=1.0)
    ada.accumulate(torch.ones(64))                      # r_t = 1 > 0.6: D is overconfident
    ada.update(images_seen=100)
    assert ada.p == pytest.approx(0.1) and ada.rt == 1.0
    ada.accumulate(-torch.ones(64))
    ada.update(images_seen=1000)
    assert ada.p == 0.0


# -- networks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_networks_have_the_right_shapes_at_every_resolution(resolution):
    cfg = TrainConfig(resolution=resolution, g_channels=32, d_channels=8, min_channels=8, max_channels=32)
    g, d, e = build_networks(cfg, channels=3, num_classes=4)
    z, y = torch.randn(2, cfg.z_dim), torch.tensor([0, 3])
    img = g(z, y)
    assert img.shape == (2, 3, resolution, resolution) and img.abs().max() <= 1
    assert d(img, y).shape == (2,)
    assert d.features(img).shape == (2, d.feature_dim)
    assert d.rotation_logits(img).shape == (2, 4)
    r = min(resolution, 16)
    assert d.complete(img).shape == (2, 3, r, r)
    mu, logvar = e(img)
    assert mu.shape == logvar.shape == (2, cfg.z_dim)
    if resolution >= 128:
        assert len(g.sle) >= 1                           # FastGAN skip-layer excitation at high resolution


def test_conditional_networks_require_labels():
    g = Generator(32, 1, 16, num_classes=3, base_channels=32)
    with pytest.raises(ValueError, match="conditional"):
        g(torch.randn(2, 16))


def test_global_batchnorm_equals_batchnorm_in_one_process():
    torch.manual_seed(0)
    bn, ref = GlobalBatchNorm2d(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    assert torch.allclose(bn(x), ref(x))


# -- checkpoints ---------------------------------------------------------------------------------------

def _save_tiny(tmp_path, classes=("a", "b")):
    cfg = TrainConfig(resolution=32, g_channels=32, d_channels=8, min_channels=8, max_channels=32, kimg=1)
    g, d, e = build_networks(cfg, 1, len(classes))
    nets = {"G": g, "G_ema": copy.deepcopy(g), "D": d, "E": e}
    opt = torch.optim.Adam(g.parameters())
    g(torch.randn(2, cfg.z_dim), torch.tensor([0, 1])).mean().backward()
    opt.step()
    meta = RunMeta(config=cfg, conditional=True, classes=tuple(classes), channels=1, step=5, nimg=64, elapsed_s=1.0)
    return save_checkpoint(tmp_path, nets, {"G": opt}, {"loop": torch.Generator().get_state()}, meta), g


def test_checkpoint_round_trip_rebuilds_networks_without_pickle(tmp_path):
    path, g = _save_tiny(tmp_path)
    assert path.read_bytes()[8:9] == b"{"                       # a safetensors JSON header, not a pickle
    assert resolve_checkpoint(tmp_path) == path
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.classes == ["a", "b"] and ckpt.num_classes == 2 and ckpt.channels == 1 and ckpt.step == 5
    assert len(ckpt.digest) == 64
    for k, v in g.state_dict().items():
        assert torch.equal(ckpt.G.state_dict()[k], v)
    assert not any(p.name.endswith(".tmp") or ".tmp-" in p.name for p in (tmp_path / "checkpoints").iterdir())


def test_bad_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(UserError, match="not found"):
        resolve_checkpoint(tmp_path / "missing")
    path, _ = _save_tiny(tmp_path)
    path.write_bytes(path.read_bytes()[:100])                  # truncated
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint(path)


def test_config_rejects_bad_values_and_unknown_keys():
    with pytest.raises(UserError, match="resolution"):
        TrainConfig(resolution=48)
    with pytest.raises(UserError, match="clock must be one of"):
        TrainConfig(clock="sundial")
    with pytest.raises(UserError, match="encoder_interval"):
        TrainConfig(encoder_interval=0)
    with pytest.raises(UserError, match="mode_seeking_weight"):
        TrainConfig(mode_seeking_weight=-1)
    with pytest.raises(UserError, match="class_g_weight needs class_d_weight"):
        TrainConfig(class_g_weight=0.2)
    with pytest.raises(UserError, match="unknown config keys: colour"):
        TrainConfig.from_dict({"colour": 1})
    cfg = TrainConfig.from_dict({"diffaug": ["color"], "betas": [0.0, 0.9]})
    assert cfg.diffaug == ("color",) and cfg.betas == (0.0, 0.9)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_color_augmentation_hides_a_brightness_error_from_d_translation_does_not(shared_data):
    """Why the default DiffAugment is translation only. At the p that ADA reaches within a few thousand CPU
    steps (0.8), random brightness/contrast spreads every image's stroke level so widely that a generator whose
    strokes are too dark looks like the augmented reals to D: the separation (difference of the two batches'
    mean brightest pixel over its spread) falls to a third. Translation keeps it: D can still punish the error, and
    FD no longer rises along the run (benchmarks/RESULTS.md, variants `all-ops` and `color-only`)."""
    from PIL import Image

    files = sorted((shared_data / "mnist" / "3").iterdir())[:256]
    real = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("L"), dtype=np.float32))
                        for f in files])[:, None] / 127.5 - 1
    dark = (real - 0.3).clamp(-1, 1)  # a generator's systematic error: every stroke too dark

    def separation(ops: tuple[str, ...]) -> float:
        a = diffaug.apply(real, diffaug.draw(len(real), 0.8, ops, torch.Generator().manual_seed(0))).amax((1, 2, 3))
        b = diffaug.apply(dark, diffaug.draw(len(dark), 0.8, ops, torch.Generator().manual_seed(1))).amax((1, 2, 3))
        return float((a.mean() - b.mean()).abs() / torch.cat([a, b]).std())

    assert TrainConfig().diffaug == ("translation",)
    assert separation(("translation",)) == pytest.approx(separation(()))  # translation keeps it: ~2 spreads apart
    assert separation(("color",)) < 0.4 * separation(("translation",))
