"""The per-step objective: the order of a step's random draws, rank slicing, and the task registry."""
from __future__ import annotations

import torch

from augment_gan import diffaug, selfsup
from augment_gan.config import TrainConfig
from augment_gan.models import build_networks
from augment_gan.objective import TASKS, BatchLayout, Objective, active_tasks, draw_step

CFG = TrainConfig(resolution=32, batch_size=8, z_dim=16, g_channels=32, d_channels=8, min_channels=8,
                  max_channels=32, kimg=1)


def test_the_order_of_a_steps_random_draws_is_pinned():
    # Resume and DDP are exact only because every run draws these numbers in this order from one generator.
    # This test spells the order out; if it fails, old checkpoints no longer resume onto the same stream.
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    layout = BatchLayout.build(8, rank=0, world=1, selfsup_fraction=0.25)
    stream = torch.Generator().manual_seed(7)
    got = draw_step(stream, layout, CFG, 0.5, 10, labels, paired=True)

    g = torch.Generator().manual_seed(7)
    B, ops, sub = 8, tuple(CFG.diffaug), layout.sub
    idx = torch.randint(10, (B,), generator=g)
    z = torch.randn(B, 16, generator=g)
    y_fake = labels[torch.randint(10, (B,), generator=g)]
    aug_real = diffaug.draw(B, 0.5, ops, g)
    aug_fake = diffaug.draw(B, 0.5, ops, g)
    rot_k = torch.randint(4, (B,), generator=g)[sub]
    masks = selfsup.draw_masks(B, 32, g)[sub]
    z_g = torch.randn(B, 16, generator=g)
    pair_idx = torch.randint(10, (B,), generator=g)
    pair_idx[1::2] = pair_idx[0::2]
    y_g = labels[pair_idx]
    aug_g = diffaug.draw(B, 0.5, ops, g)
    rot_k_g = torch.randint(4, (B,), generator=g)[sub]
    eps = torch.randn(B, 16, generator=g)[sub]

    for name, want in [("idx", idx), ("z", z), ("y_fake", y_fake), ("rot_k", rot_k), ("masks", masks),
                       ("z_g", z_g), ("y_g", y_g), ("rot_k_g", rot_k_g), ("eps", eps)]:
        assert torch.equal(getattr(got, name), want), name
    for name, want in [("aug_real", aug_real), ("aug_fake", aug_fake), ("aug_g", aug_g)]:
        have = getattr(got, name)
        assert have.keys() == want.keys(), name
        assert all(torch.equal(have[k], want[k]) for k in want), name
    assert torch.equal(got.y_g[0::2], got.y_g[1::2])        # paired for mode seeking
    assert torch.equal(stream.get_state(), g.get_state())      # and the step drew nothing else


def test_unconditional_runs_draw_the_label_numbers_too():
    # Turning conditioning off must not shift the stream: the label draws are made and discarded.
    layout = BatchLayout.build(8, rank=0, world=1, selfsup_fraction=0.25)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = draw_step(g1, layout, CFG, 0.0, 10, torch.zeros(10, dtype=torch.long), paired=False)
    b = draw_step(g2, layout, CFG, 0.0, 10, None, paired=False)
    assert b.y_fake is None and b.y_g is None and torch.equal(a.eps, b.eps)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_each_rank_keeps_its_slice_of_the_global_draws():
    one = draw_step(torch.Generator().manual_seed(1), BatchLayout.build(8, 0, 1, 0.25), CFG, 0.3, 10, None,
                    paired=False)
    halves = [draw_step(torch.Generator().manual_seed(1), BatchLayout.build(8, r, 2, 0.25), CFG, 0.3, 10, None,
                        paired=False) for r in (0, 1)]
    for name in ("idx", "z", "z_g", "rot_k", "eps"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(one, name)), name


def test_tasks_are_summed_with_their_weights_and_only_when_on():
    assert active_tasks(CFG.replace(mode_seeking_weight=0), False, "D") == []
    conf = CFG.replace(rotation_d_weight=0.7, completion_weight=0.0, class_d_weight=1.0, mode_seeking_weight=0)
    assert [t.name for t in active_tasks(conf, False, "D")] == ["loss_rot_d"]       # classes need a conditional run
    assert [t.name for t in active_tasks(conf, True, "D")] == ["loss_class_d", "loss_rot_d"]
    assert {t.name for t in TASKS} >= {"loss_r1", "loss_rot_d", "loss_completion", "loss_class_d", "loss_class_g",
                                       "loss_rot_g", "loss_ms"}

    torch.manual_seed(0)
    G, D, E = build_networks(conf, 1, 0)
    layout = BatchLayout.build(8, 0, 1, 0.25)
    draws = draw_step(torch.Generator().manual_seed(0), layout, conf, 0.0, 10, None, paired=False)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    objective = Objective(conf, G, D, G, E, device=torch.device("cpu"), layout=layout, conditional=False)
    G.eval(), D.eval()   # BatchNorm in eval mode: the same forward gives the same numbers twice
    loss, _, logs = objective.d_loss(x, None, draws)
    assert set(logs) == {"loss_d", "loss_rot_d"}
    assert torch.allclose(loss, logs["loss_d"] + 0.7 * logs["loss_rot_d"])
