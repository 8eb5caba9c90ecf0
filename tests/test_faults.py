"""Fault injection with real processes: `kill -9` at any moment, damaged and foreign checkpoints, a full disk,
a read-only folder, two writers at once. What must hold after each: one line of error, no partial or
temporary file that a later command trips over, earlier outputs intact, and the same command (plus --resume
for fit) finishing what was started, with the bytes an uninterrupted run writes.

Children are `python -m augment_gan ...` processes with one torch thread each; the checks and the recovery
runs happen in this process, where torch is already imported.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from augment_gan import checkpoint as checkpoint_module
from augment_gan import train as train_module
from augment_gan.cli import app
from augment_gan.checkpoint import (
    checkpoint_step,
    file_digest,
    list_checkpoints,
    load_checkpoint,
    load_training_state,
    unfinished_files,
)
from augment_gan.config import TrainConfig
from augment_gan.errors import UserError
from augment_gan.imagefile import readable_image
from augment_gan.merge import merge_folders
from augment_gan.synth import SynthConfig, synth
from augment_gan.train import WriteFailed, fit
from augment_gan.vary import VaryConfig, vary
from fakesynth import copy_classes

pytest_plugins = ["fixtures_run"]  # tiny_run, digits100 (session-scoped)

# Tiny networks: a training step and a checkpoint take milliseconds, a child process is mostly Python start-up.
TINY = dict(resolution=32, batch_size=8, g_channels=32, d_channels=8, min_channels=8, max_channels=32, z_dim=16,
            log_every=2, encoder_interval=2)
STEPS = 6                                   # steps of the kill test's run, one checkpoint after each
KILL_POINTS_PER_SAVE = 9                    # checkpoint._fault_point: 3 files × (half written, written, renamed)
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
needs_rlimit = pytest.mark.skipif(sys.platform == "win32", reason="a full disk is simulated with RLIMIT_FSIZE")

# Runs a command with a file size limit, as a full disk would stop it: writes past the limit fail with EFBIG
# (SIGXFSZ ignored, so the write returns an error instead of killing the process).
_LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1]))); "
            "os.execv(sys.argv[2], sys.argv[2:])")


# Runs several commands in one child process (one torch import), as the CLI would: each gives its exit code,
# its output, and the exception that ended it when that was not the CLI's own exit.
_COMMANDS = r"""
import json, sys
from click.testing import CliRunner
from augment_gan.cli import app
results = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args)
    crash = None if isinstance(result.exception, (SystemExit, type(None))) else repr(result.exception)
    results.append({"exit": result.exit_code, "output": result.output, "crash": crash})
print(json.dumps(results))
"""


def _commands_in_child(commands: list[list], prefix: list[str] = (), limit: int | None = None) -> list[dict]:
    """`_COMMANDS` in a child process, under `prefix` (e.g. unshare) and a file size `limit` (a full disk)."""
    python = [sys.executable, "-c", _LIMITED, str(limit), sys.executable] if limit else [sys.executable]
    proc = subprocess.run([*prefix, *python, "-c", _COMMANDS, json.dumps([[str(a) for a in c] for c in commands])],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "AUGMENT_GAN_DEBUG": "", **extra}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "augment_gan", *map(str, args)]


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def _files(root: Path) -> dict[str, bytes]:
    """Every file under root but hidden ones (lock files), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _leftovers(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if ".tmp-" in p.name]


def _state(run: Path) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run)[-1]
    state = load_file(last)
    state.update(load_file(last.with_name(last.name.replace(".safetensors", ".state.safetensors"))))
    return state


def _wait_until(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """Return once `ready()` holds; `proc` must still be running then."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished too early: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "never got ready"
        time.sleep(0.005)


def _kill_when(proc: subprocess.Popen, ready) -> None:
    """SIGKILL `proc` as soon as `ready()` holds."""
    _wait_until(proc, ready)
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def one_thread():
    """The children run torch on one thread, and so does this process: results are compared bitwise (float
    sums split over two threads round differently), and the tiny networks here run faster on one thread
    than on two that share the cores with a child."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(shared_data, tmp_path_factory) -> Path:
    """Three digit classes, 16 real MNIST images each."""
    return copy_classes(shared_data / "mnist", tmp_path_factory.mktemp("digits"), 0, 16, classes=("0", "1", "7"))


@pytest.fixture(scope="module")
def three_checkpoints(digits, tmp_path_factory) -> tuple[Path, Path]:
    """(a run with checkpoints at steps 1, 2 and 3, the decoded-images cache its children can share)."""
    cache = tmp_path_factory.mktemp("fit-cache")
    run = tmp_path_factory.mktemp("three") / "run"
    fit(digits, TrainConfig(kimg=0.024, minutes=None, checkpoint_minutes=1e-9, **TINY), run, device="cpu",
        progress=False, cache_dir=cache)
    assert [checkpoint_step(p) for p in list_checkpoints(run)] == [1, 2, 3]
    return run, cache


# ----------------------------------------------------------------------------------------------------
# kill -9 of fit, at chosen points of a checkpoint save and at random moments.

# A process that imports torch once and forks one `augment-gan fit` per case, so twenty kill points cost twenty
# short trainings rather than twenty interpreter start-ups (torch and the optimizer's imports take ~3 s of CPU
# here). It is single-threaded when it forks (one torch thread, nothing started), which is what makes forking
# it safe. Each case is killed with SIGKILL: by itself at save point `kill_at` (AUGMENT_GAN_TEST_KILL_AT), or by
# the server `delay` seconds after the run's log.jsonl appears. One JSON line per case: how it ended.
_FORK_SERVER = r"""
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)
torch.optim.Adam([torch.zeros(1, requires_grad=True)])
from augment_gan.cli import app
import augment_gan.train
for case in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)   # stdout carries the server's report
        if case["kill_at"] is not None:
            os.environ["AUGMENT_GAN_TEST_KILL_AT"] = str(case["kill_at"])
        try:
            app.main(case["args"], prog_name="augment-gan")
        except SystemExit as exc:
            os._exit(exc.code if isinstance(exc.code, int) else 1)
        os._exit(0)
    status = None
    if case["delay"] is not None:
        while status is None and not os.path.exists(os.path.join(case["out"], "log.jsonl")):
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else time.sleep(0.002)
        if status is None:
            time.sleep(case["delay"])
            os.kill(pid, signal.SIGKILL)
    if status is None:
        _, status = os.waitpid(pid, 0)
    print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks its fit processes")
def test_fit_killed_anywhere_resumes_from_its_last_complete_checkpoint(digits, three_checkpoints, tmp_path):
    _, cache = three_checkpoints
    config = TrainConfig(kimg=STEPS * TINY["batch_size"] / 1000, minutes=None, **TINY)
    reference = tmp_path / "reference"
    fit(digits, config, reference, device="cpu", progress=False, cache_dir=cache)
    (tmp_path / "tiny.yaml").write_text(json.dumps(TINY))
    command = ["fit", str(digits), "--config", str(tmp_path / "tiny.yaml"), "--kimg", str(config.kimg),
               "--checkpoint-minutes", "0.000001", "--cache-dir", str(cache), "--device", "cpu", "--quiet"]

    # Each of the 9 moments of a save, twice, in random saves of the run; then random moments of the run. A
    # failing case prints its kill point; AUGMENT_GAN_FAULT_SEED draws other ones.
    rng = random.Random(int(os.environ.get("AUGMENT_GAN_FAULT_SEED", "0")))
    cases = [("point", rng.randrange(STEPS) * KILL_POINTS_PER_SAVE + sub)
             for sub in range(1, KILL_POINTS_PER_SAVE + 1) for _ in range(2)]
    cases += [("time", rng.uniform(0.0, 0.3)) for _ in range(4)]
    server = subprocess.run(
        [sys.executable, "-c", _FORK_SERVER, json.dumps([
            {"args": [*command, "--out", str(tmp_path / f"kill-{n}")], "out": str(tmp_path / f"kill-{n}"),
             "kill_at": at if kind == "point" else None, "delay": at if kind == "time" else None}
            for n, (kind, at) in enumerate(cases)])],
        env=_env(), capture_output=True, text=True, timeout=600)
    ends = [json.loads(line) for line in server.stdout.splitlines()]
    assert server.returncode == 0 and len(ends) == len(cases), server.stderr[-3000:]
    for n, ((kind, at), end) in enumerate(zip(cases, ends)):
        run = tmp_path / f"kill-{n}"
        # A random moment may come after the run's end; a kill point always comes before it.
        assert end["signal"] == signal.SIGKILL or (kind == "time" and end["exit"] == 0), (kind, at, end)

        # What the kill left: only complete checkpoints count, and each of them loads.
        complete = list_checkpoints(run)
        if kind == "point":
            save, sub = divmod(at - 1, KILL_POINTS_PER_SAVE)
            last_step = save + (sub == KILL_POINTS_PER_SAVE - 1)  # killed after the JSON's rename: complete
            assert [checkpoint_step(p) for p in complete] == list(range(1, last_step + 1)), (at, complete)
        for path in complete:
            load_training_state(path, run_dir=run)
        if complete:
            assert load_checkpoint(run).path == complete[-1]  # synth/vary would use the last complete one
        else:
            with pytest.raises(UserError, match="holds no checkpoint"):
                load_checkpoint(run)
        digests = {p.name: file_digest(p) for p in complete}

        # The same command (plus --resume once a checkpoint exists) finishes the run: bitwise the reference.
        if complete and checkpoint_step(complete[-1]) == STEPS:     # killed after its last save
            with pytest.raises(UserError, match="already used its budget"):
                fit(digits, config, run, device="cpu", progress=False, cache_dir=cache, resume=True)
        else:
            fit(digits, config, run, device="cpu", progress=False, cache_dir=cache, resume=bool(complete))
            assert list_checkpoints(run) == [*complete, run / "checkpoints" / f"ckpt-{STEPS:08d}.safetensors"]
        assert not _leftovers(run) and not unfinished_files(run), (at, _leftovers(run), unfinished_files(run))
        assert all(file_digest(run / "checkpoints" / name) == d for name, d in digests.items())
        a, b = _state(reference), _state(run)
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], (kind, at)
        steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(2, STEPS + 1, 2)), (kind, at, steps)


# ----------------------------------------------------------------------------------------------------
# kill -9 of synth, vary and merge; a second writer into the same folder is refused meanwhile.

def _images_in(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.png") if ".tmp-" not in p.name]


@pytest.mark.slow
def test_synth_killed_midway_finishes_byte_identical_and_a_second_synth_is_refused(tiny_run, tmp_path):
    n = 400
    reference = tmp_path / "reference"
    synth(tiny_run, reference, SynthConfig(n=n, progress=False, device="cpu"))
    out = tmp_path / "set"
    args = ["synth", tiny_run, "--n", n, "--out", out, "--batch-size", "1", "--workers", "1", "--device", "cpu",
            "--quiet"]
    proc = subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(proc, lambda: out.is_dir() and len(_images_in(out)) >= 10)
        runner = CliRunner()
        for extra in ([], ["--shard", "0/2"], ["--seed", "1", "--overwrite"]):   # while it runs: refused
            second = runner.invoke(app, [str(a) for a in args] + extra)
            assert second.exit_code == 1 and "in use by another running `augment-gan synth`" in second.output, \
                second.output
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert 10 <= len(_images_in(out)) < n
    again = CliRunner().invoke(app, [str(a) for a in args])                 # the same command
    assert again.exit_code == 0, again.output
    assert not _leftovers(out) and _files(out) == _files(reference)
    assert all(readable_image(p, 32) for p in _images_in(out)) and len(_images_in(out)) == n


@pytest.mark.slow
def test_vary_killed_midway_finishes_byte_identical(tiny_run, digits100, tmp_path):
    reference = tmp_path / "reference"
    vary(tiny_run, digits100, reference, VaryConfig(n=8, progress=False, device="cpu"))
    out = tmp_path / "varied"
    args = ["vary", tiny_run, digits100, "--n", "8", "--out", out, "--batch-size", "4", "--workers", "1",
            "--device", "cpu", "--quiet"]
    proc = subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, lambda: out.is_dir() and len(_images_in(out)) >= 10)
    proc.stderr.close()
    assert len(_images_in(out)) < 800 and not (out / "manifest.jsonl").exists()
    again = CliRunner().invoke(app, [str(a) for a in args])
    assert again.exit_code == 0, again.output
    assert not _leftovers(out) and _files(out) == _files(reference) and len(_images_in(out)) == 800


@pytest.mark.slow
def test_merge_killed_midway_finishes_byte_identical_and_a_second_merge_is_refused(digits, tmp_path):
    reference = tmp_path / "reference"
    merge_folders(digits, None, reference, "standard", copies=12, progress=False)
    out = tmp_path / "merged"
    args = ["merge", "--real", digits, "--out", out, "--copies", "12", "--quiet"]
    proc = subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until(proc, lambda: out.is_dir() and len(_images_in(out)) >= 10)
        second = CliRunner().invoke(app, [str(a) for a in args])
        assert second.exit_code == 1 and "in use by another running `augment-gan merge`" in second.output
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert json.loads((out / "merge.json").read_text())["complete"] is False
    again = CliRunner().invoke(app, [str(a) for a in args])                 # the same command finishes it
    assert again.exit_code == 0, again.output
    assert not _leftovers(out)
    got, want = _files(out), _files(reference)
    assert got.pop("merge.json") and want.pop("merge.json")                 # holds its creation time
    assert got == want and len(_images_in(out)) == 48 * 12
    # A finished merge is not redone without --overwrite.
    assert "pass --overwrite" in CliRunner().invoke(app, [str(a) for a in args]).output


# ----------------------------------------------------------------------------------------------------
# Damaged and foreign checkpoints: one line naming the file and the way out, never a silent fall back.

@pytest.fixture
def damaged_run(three_checkpoints, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(three_checkpoints[0], run)
    return run


def _newest(run: Path) -> Path:
    return run / "checkpoints" / "ckpt-00000003.safetensors"


@pytest.mark.parametrize("damage", ["truncated weights", "garbled json", "json of another step", "foreign run",
                                    "foreign run, no config.json", "truncated state"])
def test_a_damaged_newest_checkpoint_is_named_and_the_valid_one_is_only_used_when_asked(
        damage, damaged_run, digits, shared_data, tmp_path):
    run, newest = damaged_run, _newest(damaged_run)
    if damage == "truncated weights":
        newest.write_bytes(newest.read_bytes()[:5000])
    elif damage == "garbled json":
        newest.with_suffix(".json").write_text('{"step": 3, "config": {')
    elif damage == "json of another step":
        shutil.copy(run / "checkpoints" / "ckpt-00000001.json", newest.with_suffix(".json"))
    elif damage.startswith("foreign run"):
        # A checkpoint of an RGB run with other classes, dropped into this run's folder.
        emoji = tmp_path / "emoji"
        for cls in ("flags", "food-drink"):
            (emoji / cls).mkdir(parents=True)
            for f in sorted((shared_data / "emoji-twitter" / cls).iterdir())[:8]:
                shutil.copy(f, emoji / cls / f.name)
        other = tmp_path / "other"
        fit(emoji, TrainConfig(kimg=0.008, minutes=None, **TINY), other, device="cpu", progress=False)
        for name in ("ckpt-00000001.safetensors", "ckpt-00000001.state.safetensors", "ckpt-00000001.json"):
            shutil.copy(other / "checkpoints" / name, newest.with_name(name.replace("00000001", "00000003")))
        if damage.endswith("no config.json"):
            (run / "config.json").unlink()           # then the run's other checkpoints are the reference
    elif damage == "truncated state":
        state = newest.with_name("ckpt-00000003.state.safetensors")
        state.write_bytes(state.read_bytes()[:5000])

    named = {"truncated state": "ckpt-00000003.state.safetensors", "garbled json": "ckpt-00000003.json",
             "json of another step": "ckpt-00000003.json"}.get(damage, "ckpt-00000003.safetensors")
    way_out = "newest valid checkpoint of this run is " + str(run / "checkpoints" / "ckpt-00000002.safetensors")
    config = TrainConfig(kimg=0.040, minutes=None, **TINY)
    if damage != "truncated state":                  # sampling needs no optimizer state
        with pytest.raises(UserError, match=named) as error:
            load_checkpoint(run)
        assert way_out in str(error.value) and "\n" not in str(error.value)
        result = CliRunner().invoke(app, ["synth", str(run), "--n", "4", "--out", str(tmp_path / "s"), "--quiet"])
        assert result.exit_code == 1 and named in result.output and way_out in result.output
        assert not (tmp_path / "s").exists()
    with pytest.raises(UserError, match=named) as error:
        fit(digits, config, run, device="cpu", progress=False, resume=True)
    assert way_out in str(error.value)
    result = CliRunner().invoke(app, ["fit", str(digits), "--out", str(run), "--resume", "--quiet"])
    assert result.exit_code == 1 and named in result.output and "--resume --checkpoint FILE" in result.output

    # Asked for explicitly, the valid one is used: synth takes the file, fit --resume --checkpoint continues it
    # and moves the later checkpoint aside (kept, not deleted).
    valid = run / "checkpoints" / "ckpt-00000002.safetensors"
    assert synth(valid, tmp_path / "s2", SynthConfig(n=4, progress=False)).images == 4
    fit(digits, config, run, device="cpu", progress=False, resume=True, checkpoint=valid)
    assert [checkpoint_step(p) for p in list_checkpoints(run)] == [1, 2, 5]
    assert (run / "checkpoints" / "superseded" / newest.name).exists()
    assert load_checkpoint(run).step == 5


def test_a_checkpoint_without_its_json_is_an_unfinished_save_skipped_with_a_warning(damaged_run, digits, caplog):
    # The rule for a missing JSON: it is what a killed save leaves (the JSON is written last), so readers skip
    # it, naming it, and the next fit removes it.
    run = damaged_run
    _newest(run).with_suffix(".json").unlink()
    assert load_checkpoint(run).step == 2
    assert "ckpt-00000003.safetensors" in caplog.text and "has not finished" in caplog.text
    fit(digits, TrainConfig(kimg=0.032, minutes=None, **TINY), run, device="cpu", progress=False, resume=True)
    assert [checkpoint_step(p) for p in list_checkpoints(run)] == [1, 2, 4]
    assert not unfinished_files(run)


# ----------------------------------------------------------------------------------------------------
# A full disk.

def test_a_failed_save_keeps_the_last_good_checkpoint_and_says_what_it_holds(digits, three_checkpoints, tmp_path,
                                                                            monkeypatch):
    _, cache = three_checkpoints
    run = tmp_path / "run"
    real_write, real_release, held = checkpoint_module._write, train_module._Room.release, []

    def disk_full_at_the_third_save(path, data):
        assert not list(path.parent.glob(".room-*"))              # the held space was given back for the save
        if path.name == "ckpt-00000003.state.safetensors":      # the weights of this save are already written
            raise OSError(errno.ENOSPC, "No space left on device", str(path) + f".tmp-{os.getpid()}")
        real_write(path, data)

    def release(room):
        held.append(len(room.files) == 2 and all(p.stat().st_size >= 65536 for p in room.files))
        real_release(room)

    monkeypatch.setattr(checkpoint_module, "_write", disk_full_at_the_third_save)
    monkeypatch.setattr(train_module._Room, "release", release)
    with pytest.raises(WriteFailed) as error:
        fit(digits, TrainConfig(kimg=0.064, minutes=None, checkpoint_minutes=1e-9, **TINY), run, device="cpu",
            progress=False, cache_dir=cache)
    message = str(error.value)
    assert "stopped at step 3" in message and "the disk is full" in message and "\n" not in message
    assert "the last good checkpoint is " + str(run / "checkpoints" / "ckpt-00000002.safetensors") in message
    assert "(step 2, 0.02 kimg" in message and "the steps after it (1) are lost" in message
    assert [checkpoint_step(p) for p in list_checkpoints(run)] == [1, 2]
    assert not unfinished_files(run) and not _leftovers(run)
    assert held[:3] == [True] * 3        # between saves the space of a checkpoint is held, from the start
    monkeypatch.setattr(checkpoint_module, "_write", real_write)
    fit(digits, TrainConfig(kimg=0.064, minutes=None, **TINY), run, device="cpu", progress=False, cache_dir=cache,
        resume=True)
    assert checkpoint_step(list_checkpoints(run)[-1]) == 8


@needs_rlimit
def test_a_run_folder_that_cannot_hold_a_checkpoint_fails_before_training(three_checkpoints, digits, tmp_path):
    # A file size limit below one checkpoint: the run stops before its first step, for a new run and for a
    # resumed one, whose checkpoints and log stay as they were.
    run, cache = three_checkpoints
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    before = _files(resumed)
    (tmp_path / "tiny.yaml").write_text(json.dumps(TINY))
    common = ["--kimg", "0.2", "--cache-dir", cache, "--device", "cpu", "--quiet"]
    results = _commands_in_child([["fit", digits, "--out", tmp_path / "new", "--config", tmp_path / "tiny.yaml",
                                   *common], ["fit", digits, "--out", resumed, "--resume", *common]], limit=100_000)
    for result in results:
        assert result["exit"] == 1 and not result["crash"], result
        error = _one_line_error(result["output"])
        assert "cannot hold a checkpoint of this run" in error and "File too large" in error
        assert "stopped before training" in error
    assert not (tmp_path / "new").exists()                    # a new run leaves nothing behind
    assert _files(resumed) == before and not _leftovers(resumed)


@needs_rlimit
def test_a_full_disk_at_the_end_of_synth_keeps_every_image_and_the_same_command_finishes(tiny_run, tmp_path):
    # Images (about 1 kB) fit under the limit, the manifest (100 rows) does not: synth fails at its last
    # write, with one line; nothing partial is left, and the same command finishes from what is there.
    reference = tmp_path / "reference"
    synth(tiny_run, reference, SynthConfig(n=100, progress=False, device="cpu"))
    out = tmp_path / "set"
    args = ["synth", tiny_run, "--n", "100", "--out", out, "--device", "cpu", "--quiet"]
    proc = subprocess.run([sys.executable, "-c", _LIMITED, "8000", *_cmd(*args)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert _one_line_error(proc.stderr) == f"Error: {out / 'manifest.jsonl'}: File too large"
    assert not _leftovers(out) and not (out / "manifest.jsonl").exists()
    assert len(_images_in(out)) == 100 and all(readable_image(p, 32) for p in _images_in(out))
    again = CliRunner().invoke(app, [str(a) for a in args])
    assert again.exit_code == 0 and "0 written, 100 already there" in again.output, again.output
    assert _files(out) == _files(reference)


# ----------------------------------------------------------------------------------------------------
# A read-only output folder, for every command that writes.

def _read_only(folders: list[Path]) -> list[str]:
    """Make `folders` read-only for the children; returns the command prefix the children need for it.

    Root writes through permissions, so as root a child runs in a new user namespace (`unshare --user`): it
    keeps its files (their owner is still it) but loses the capabilities that bypass permission bits.
    """
    for folder in folders:
        folder.chmod(0o555)
    prefix = ["unshare", "--user"] if ROOT else []
    if ROOT and not shutil.which("unshare"):
        pytest.skip("running as root, and without `unshare` a folder cannot be made read-only for a child")
    probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(folders[0] / 'probe')!r}, 'w')"],
                           capture_output=True, text=True)
    if probe.returncode == 0 or "PermissionError" not in probe.stderr:
        (folders[0] / "probe").unlink(missing_ok=True)
        pytest.skip(f"cannot make a folder read-only for a child process here: {probe.stderr.strip()[-200:]}")
    return prefix


@pytest.mark.slow
def test_every_writing_command_reports_a_read_only_folder_in_one_line(tiny_run, digits, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("cache"))
    ro = tmp_path / "ro"
    synth(run, ro / "set", SynthConfig(n=20, progress=False, device="cpu"))   # an earlier output in there
    folders = [ro, *(p for p in ro.rglob("*") if p.is_dir())]
    before = _files(ro)
    commands = {
        "fit": ["fit", digits, "--out", ro / "run", "--kimg", "0.016", "--device", "cpu", "--quiet"],
        "synth": ["synth", run, "--n", "10", "--seed", "1", "--overwrite", "--out", ro / "set", "--quiet"],
        "vary": ["vary", run, digits, "--n", "1", "--out", ro / "varied", "--quiet"],
        "merge": ["merge", "--real", digits, "--out", ro / "merged", "--quiet"],
        "evaluate": ["evaluate", "--real", digits, "--synthetic", ro / "set", "--features", "pixels", "--out",
                     ro / "eval"],
        "report": ["report", run, "--out", ro / "report.html"],
    }
    try:
        results = _commands_in_child(list(commands.values()), prefix=_read_only(folders))
        for name, result in zip(commands, results):
            assert result["exit"] == 1 and not result["crash"], (name, result)
            assert _one_line_error(result["output"]).endswith("Permission denied"), (name, result["output"])
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert _files(ro) == before and not _leftovers(ro)


# ----------------------------------------------------------------------------------------------------
# Operating-system errors of the arguments themselves.

def test_bad_output_paths_are_one_line_errors(tiny_run, digits, tmp_path):
    runner = CliRunner()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    long_name = tmp_path / ("x" * 300)
    cases = [
        (["fit", digits, "--out", a_file, "--kimg", "0.016"], "is a file, not a run directory"),
        (["synth", tiny_run, "--n", "4", "--out", a_file / "sub"], "Not a directory"),
        (["synth", tiny_run, "--n", "4", "--out", long_name], "File name too long"),
        (["fit", digits, "--out", long_name, "--kimg", "0.016"], "File name too long"),
        (["merge", "--real", digits, "--out", a_file / "sub"], "Not a directory"),
    ]
    for args, message in cases:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert result.output.count("\n") == 1 and result.output.startswith("Error: "), result.output
    assert a_file.read_text() == "not a folder"


# ----------------------------------------------------------------------------------------------------
# Fuzzed inputs: inspect and fit read every good file, skip and name every bad one, and finish.

def _fuzzed_folder(shared_data: Path, root: Path, seed: int = 0) -> tuple[set[str], set[str]]:
    """Real MNIST and emoji images as PNG, JPEG and WebP, most with random bytes flipped, plus a FIFO, a
    broken link, an unreadable file and a folder named like an image -> (good files, files that may be bad)."""
    import io

    from PIL import Image

    rng = random.Random(seed)
    sources = sorted((shared_data / "mnist").rglob("*.png"))[::120][:40] + \
        sorted((shared_data / "emoji-twitter").rglob("*.png"))[::48][:40]
    good, suspect = set(), set()
    for k, source in enumerate(sources):
        folder = root / ("digits" if "mnist" in source.parts else "emoji")
        folder.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as opened:
            image = opened.convert("RGBA") if opened.mode == "P" else opened.copy()
            for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")):
                buffer = io.BytesIO()
                (image.convert("RGB") if fmt == "JPEG" else image).save(buffer, fmt)
                data = bytearray(buffer.getvalue())
                name = f"{folder.name}/{k:03d}.{ext}"
                if k % 8 == 0:
                    good.add(name)
                else:
                    for _ in range(rng.randint(1, 6)):
                        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                    suspect.add(name)
                (root / name).write_bytes(bytes(data))
    os.mkfifo(root / "digits" / "fifo.png")                            # open() would block forever
    (root / "digits" / "broken-link.png").symlink_to(root / "nowhere.png")
    (root / "emoji" / "folder.png").mkdir()                            # a folder with an image's name
    unreadable = root / "emoji" / "unreadable.png"
    unreadable.write_bytes((root / sorted(good)[0]).read_bytes())
    unreadable.chmod(0)
    (good if ROOT else suspect).add("emoji/unreadable.png")            # root reads it anyway
    suspect |= {"digits/fifo.png", "digits/broken-link.png"}
    return good, suspect


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fuzzed_files_are_skipped_by_name_and_good_ones_read(shared_data, tmp_path):
    root = tmp_path / "fuzzed"
    good, suspect = _fuzzed_folder(shared_data, root)
    assert len(good) + len(suspect) > 200
    started = time.monotonic()
    inspect = subprocess.run(_cmd("inspect", root, "--resolution", "32", "--json"), env=_env(), capture_output=True,
                             text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr[-3000:]
    summary = json.loads(inspect.stdout)
    skipped = {entry["file"]: entry["reason"] for entry in summary["skipped"]}
    assert summary["candidates"] == len(good) + len(suspect)               # every file accounted for
    assert summary["images"] + len(skipped) == summary["candidates"]
    assert not good & set(skipped) and set(skipped) <= suspect             # good ones read, bad ones named
    assert "regular file" in skipped["digits/fifo.png"] and "not found" in skipped["digits/broken-link.png"]

    fitted = subprocess.run(_cmd("fit", root, "--out", tmp_path / "run", "--kimg", "0.016", "--batch-size", "8",
                                 "--device", "cpu"), env=_env(), capture_output=True, text=True, timeout=300)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    for name in skipped:
        assert f"skipped {name}: " in fitted.stderr                          # each named, in one line
    assert load_checkpoint(tmp_path / "run").meta.data.images == summary["images"]
    assert time.monotonic() - started < 120
