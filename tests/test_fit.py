"""End-to-end behaviour of `fit`: outputs, exact resume, lock, NaN stop, conditioning, CLI, DDP, signals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from augment_gan import losses
from augment_gan.checkpoint import list_checkpoints, load_checkpoint
from augment_gan.cli import app
from augment_gan.config import TrainConfig
from augment_gan.data import ReadOptions, load_folder
from augment_gan.errors import UserError
from augment_gan.guard import run_lock
from augment_gan.models import build_networks
from augment_gan.pixels import hwc_to_nchw, to_float
from augment_gan.train import TrainingDiverged, fit
from fakesynth import copy_classes

# Small networks keep each step a few milliseconds on a CPU.
# Every self-supervised constraint (and the mode-seeking term, whose fake labels come in pairs, and the auxiliary
# classifier) is on, whatever the defaults, so resume and DDP cover their randomness; E trains every other step,
# so resume covers that too.
# lr pinned at 2e-4: Adam moves a weight by up to ~lr per step whatever the gradient's size, so the gloo test's
# float-rounding tolerance (1e-3 over 6 steps) is calibrated for this lr, not for whatever the default becomes.
TINY = dict(resolution=32, batch_size=8, g_channels=32, d_channels=8, min_channels=8, max_channels=32,
            z_dim=16, log_every=2, ada_interval=1, ada_kimg=0.5, minutes=None, g_lr=2e-4, d_lr=2e-4,
            rotation_d_weight=1.0, rotation_g_weight=0.2, completion_weight=1.0, encoder_weight=1.0,
            encoder_interval=2, mode_seeking_weight=1.0, class_d_weight=1.0, class_g_weight=0.2)


@pytest.fixture(scope="module")
def digits(shared_data, tmp_path_factory) -> Path:
    """Three digit classes, 16 real MNIST images each."""
    return copy_classes(shared_data / "mnist", tmp_path_factory.mktemp("digits"), 0, 16, classes=("0", "1", "7"))


def _all_state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = list_checkpoints(run)[-1]
    state = load_file(ckpt)
    state.update(load_file(ckpt.with_name(ckpt.name.replace(".safetensors", ".state.safetensors"))))
    return state


def test_fit_writes_checkpoint_grid_log_and_config(digits, tmp_path):
    run = tmp_path / "run"
    path = fit(digits, TrainConfig(kimg=0.032, **TINY), run, device="cpu", progress=False)
    assert path == list_checkpoints(run)[-1]
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["classes"] == ["0", "1", "7"] and meta["conditional"] and meta["channels"] == 1
    assert meta["step"] == 4 and meta["nimg"] == 32 and 0 <= meta["ada"]["p"] <= 1
    assert meta["config"]["batch_size"] == 8 and meta["package_version"]
    assert (run / "grids" / "grid-00000004.png").exists() and (run / "config.json").exists()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for key in ("kimg", "time_s", "img_per_s", "p", "rt", "loss_d", "loss_g", "loss_rot_d", "loss_rot_g",
                "loss_completion", "loss_encoder", "loss_class_d", "loss_class_g"):
        assert key in records[-1]
    ckpt = load_checkpoint(run)
    assert ckpt.D.classify is not None and ckpt.D.classify.out_features == 3
    img = ckpt.G_ema(torch.randn(3, 16), torch.tensor([0, 1, 2]))
    assert img.shape == (3, 1, 32, 32)


def test_the_auxiliary_classifier_learns_the_classes_and_is_absent_by_default(digits, tmp_path):
    # D's class head (class_d_weight) is trained on the augmented real images; after 60 steps it must tell
    # this 3-class folder's images apart far above chance (1/3). Without the weights the head is not built,
    # so checkpoints of earlier runs (no `D.classify.*` tensors) still load strictly.
    run = tmp_path / "run"
    fit(digits, TrainConfig(kimg=0.48, **TINY), run, device="cpu", progress=False)
    data = load_folder(digits, ReadOptions(resolution=32))
    ckpt = load_checkpoint(run)
    with torch.no_grad():
        pred = ckpt.D.classify(ckpt.D.features(to_float(hwc_to_nchw(data.images)))).argmax(1)
    accuracy = float((pred == torch.as_tensor(data.labels)).float().mean())
    assert accuracy > 0.8, accuracy
    _, d, _ = build_networks(TrainConfig(), channels=1, num_classes=3)
    assert d.classify is None and not any(k.startswith("classify") for k in d.state_dict())


def test_resume_ends_bitwise_where_an_uninterrupted_run_ends(digits, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    fit(digits, TrainConfig(kimg=0.096, **TINY), straight, device="cpu", progress=False)
    fit(digits, TrainConfig(kimg=0.040, **TINY), split, device="cpu", progress=False)
    fit(digits, TrainConfig(kimg=0.096, **TINY), split, device="cpu", progress=False, resume=True)
    a, b = _all_state(straight), _all_state(split)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    meta = json.loads(list_checkpoints(split)[-1].with_suffix(".json").read_text())
    assert meta["step"] == 12 and meta["ada"] == json.loads(
        list_checkpoints(straight)[-1].with_suffix(".json").read_text())["ada"]


def test_resume_refuses_a_changed_config_and_fresh_runs_refuse_to_overwrite(digits, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(UserError, match="nothing|no checkpoint"):
        fit(digits, TrainConfig(kimg=0.016, **TINY), run, device="cpu", progress=False, resume=True)
    fit(digits, TrainConfig(kimg=0.016, **TINY), run, device="cpu", progress=False)
    with pytest.raises(UserError, match="already holds a run"):
        fit(digits, TrainConfig(kimg=0.016, **TINY), run, device="cpu", progress=False)
    with pytest.raises(UserError, match="seed differ"):
        fit(digits, TrainConfig(kimg=0.032, **{**TINY, "seed": 1}), run, device="cpu", progress=False, resume=True)


def test_a_locked_run_directory_is_refused(digits, tmp_path):
    run = tmp_path / "run"
    with run_lock(run):
        with pytest.raises(UserError, match="in use by another"):
            fit(digits, TrainConfig(kimg=0.016, **TINY), run, device="cpu", progress=False)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(digits, tmp_path, monkeypatch):
    run = tmp_path / "run"
    fit(digits, TrainConfig(kimg=0.016, **TINY), run, device="cpu", progress=False)
    good = _all_state(run)
    calls = {"n": 0}
    real_g_loss = losses.g_loss

    def poisoned(logits, kind="hinge"):
        calls["n"] += 1
        out = real_g_loss(logits, kind)
        return out * float("nan") if calls["n"] >= 2 else out

    monkeypatch.setattr(losses, "g_loss", poisoned)
    # The check reads flags kept on the device every log_every (2) steps, so it fires within 2 steps.
    with pytest.raises(TrainingDiverged, match=r"G loss became NaN/inf at step 3 \(noticed at step 4\).*ckpt-00000002"):
        fit(digits, TrainConfig(kimg=0.2, **TINY), run, device="cpu", progress=False, resume=True)
    assert len(list_checkpoints(run)) == 1
    after = _all_state(run)
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_unconditional_flag_and_unlabeled_folders_train_without_classes(digits, tmp_path):
    run = tmp_path / "run"
    fit(digits, TrainConfig(kimg=0.016, conditional=False, **TINY), run, device="cpu", progress=False)
    ckpt = load_checkpoint(run)
    assert ckpt.num_classes == 0 and ckpt.G_ema.embed is None and ckpt.D.project is None
    assert ckpt.G_ema(torch.randn(2, 16)).shape == (2, 1, 32, 32)


def test_cli_fit_and_its_one_line_errors(digits, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(app, ["fit", str(digits), "--out", str(run), "--kimg", "0.016", "--batch-size", "8", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "trained 2 steps (0.02 kimg)" in res.stdout and "final adaptive augmentation p" in res.stdout
    assert f"checkpoint: {run / 'checkpoints' / 'ckpt-00000002.safetensors'}" in res.stdout
    assert f"samples:    {run / 'grids' / 'grid-00000002.png'}" in res.stdout
    res = runner.invoke(app, ["fit", str(digits), "--out", str(run), "--kimg", "0.016"])
    assert res.exit_code != 0 and "already holds a run" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["fit", str(digits), "--out", str(run), "--resume", "--seed", "3"])
    assert res.exit_code != 0 and "seed differ" in res.output
    res = runner.invoke(app, ["fit", str(digits), "--out", str(run), "--resume", "--kimg", "0.016"])
    assert res.exit_code != 0 and "already used its budget (0.016 kimg, --kimg 0.016)" in res.output
    assert "pass a larger --kimg" in res.output
    res = runner.invoke(app, ["fit", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")])
    assert res.exit_code != 0 and "not found" in res.output
    assert not (tmp_path / "r2").exists()                      # nothing created when the input is bad
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1\n")
    res = runner.invoke(app, ["fit", str(digits), "--out", str(tmp_path / "r3"), "--config", str(bad)])
    assert res.exit_code != 0 and "unknown config keys: learning_rate" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["fit", str(empty), "--out", str(tmp_path / "r4"), "--kimg", "0.016"])
    assert res.exit_code != 0 and "Traceback" not in res.output and not (tmp_path / "r4").exists()


def test_a_run_that_died_before_its_first_checkpoint_can_be_started_again(digits, tmp_path):
    # A fit killed before any checkpoint leaves log rows and a cache but nothing to resume: the same command
    # starts it over (the stale rows go), and --resume says so instead of failing without a way forward.
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 2, "kimg": 0.016}\n')
    with pytest.raises(UserError, match="without --resume"):
        fit(digits, TrainConfig(kimg=0.016, **TINY), run, device="cpu", progress=False, resume=True)
    fit(digits, TrainConfig(kimg=0.016, **TINY), run, device="cpu", progress=False)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and "loss_d" in rows[0]


def test_resume_drops_the_log_rows_of_steps_the_checkpoint_does_not_hold(digits, tmp_path):
    run = tmp_path / "run"
    fit(digits, TrainConfig(kimg=0.032, **TINY), run, device="cpu", progress=False)
    with open(run / "log.jsonl", "a") as f:        # rows a killed process wrote after its last checkpoint
        f.write('{"step": 6, "kimg": 0.048}\n{"step": 8, "kimg": 0.064}\n')
    fit(digits, TrainConfig(kimg=0.064, **TINY), run, device="cpu", progress=False, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_sigint_saves_a_checkpoint_that_resumes(digits, tmp_path):
    run = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({k: v for k, v in TINY.items() if k != "minutes"}))
    proc = subprocess.Popen([sys.executable, "-m", "augment_gan", "fit", str(digits), "--out", str(run),
                             "--config", str(cfg), "--minutes", "5", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_subprocess_env())
    deadline = time.time() + 120
    while time.time() < deadline and not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted at kimg" in err and "Traceback" not in err
    saved = list_checkpoints(run)
    assert len(saved) == 1
    step = json.loads(saved[0].with_suffix(".json").read_text())["step"]
    fit(digits, TrainConfig(kimg=(step + 2) * 8 / 1000, **TINY), run, device="cpu", progress=False, resume=True)
    assert json.loads(list_checkpoints(run)[-1].with_suffix(".json").read_text())["step"] == step + 2


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_at_the_same_global_batch(digits, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(json.dumps({k: v for k, v in TINY.items() if k != "minutes"}))
    common = ["fit", str(digits), "--config", str(cfg), "--kimg", "0.048", "--quiet", "--device", "cpu"]
    single = subprocess.run([sys.executable, "-m", "augment_gan", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "augment_gan", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = load_file(list_checkpoints(tmp_path / "one")[-1]), load_file(list_checkpoints(tmp_path / "two")[-1])
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-3, worst
    # The match is not trivial: training moved the weights away from their initialisation.
    torch.manual_seed(0)
    g_init, _, _ = build_networks(TrainConfig(**TINY, kimg=1), channels=1, num_classes=3)
    assert not torch.allclose(a["G.to_rgb.weight"], g_init.to_rgb.weight, atol=1e-3)
