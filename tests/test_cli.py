"""The command line as a whole: help on every option, one default per shared option, --quiet/--verbose,
failures that leave the file system as it was, `fit --print-config`, and recipe export to albumentations."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from augment_gan.cli import app
from fakesynth import copy_classes, write_fake_synth

pytest_plugins = ["fixtures_run"]

REPO = Path(__file__).resolve().parents[1]


def _commands(group: click.Group = app, prefix: str = ""):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_option_has_help_text():
    missing = [f"{name} {opt}" for name, command in [("augment-gan", app), *_commands()] for param in command.params
               if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip()
               for opt in param.opts[:1]]
    assert not missing, f"options without help text: {', '.join(missing)}"


# Options that share a name but not a meaning: their defaults may differ.
_DIFFERENT_MEANINGS = {
    "--n": "synth: images in the set; vary: variations per source image",
    "--batch-size": "fit: GAN batch; evaluate: classifier batch; synth/vary: generator batch",
    "--steps": "only evaluate has it",
}


def test_shared_options_have_one_default():
    defaults: dict[str, dict[str, object]] = {}
    for name, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and not param.is_flag and param.opts[0] not in _DIFFERENT_MEANINGS:
                unset = param.default is None or type(param.default).__name__ == "Sentinel"  # click 8.2: UNSET
                defaults.setdefault(param.opts[0], {})[name] = None if unset else param.default
    # Where a command computes its default (None: from the data), the fallback it documents must agree.
    for option, per_command in defaults.items():
        values = {repr(v) for v in per_command.values() if v is not None}
        assert len(values) <= 1, f"{option} has different defaults: {per_command}"
    assert defaults["--resolution"]["inspect"] == defaults["--resolution"]["fit"] == "32"
    assert defaults["--device"]["evaluate"] == defaults["--device"]["fit"] == "auto"


# ---------------------------------------------------------------------------------------------------------
# Failing on a missing input creates nothing.

def _tree(*roots: Path) -> list[tuple[str, int, int]]:
    """Every folder and file under `roots`, with each file's size and mtime: what a failed command must not
    change. (A folder's own mtime is left out: a folder created and removed again leaves nothing.)"""
    out = []
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            st = path.lstat()
            out.append((str(path), st.st_size, st.st_mtime_ns) if path.is_file() else (str(path), 0, 0))
    return out


@pytest.fixture
def workspace(tmp_path, digits100, tiny_run, monkeypatch):
    """A folder holding real digits, a synthetic set and a metrics file, with the cache inside it."""
    monkeypatch.setenv("AUGMENT_GAN_CACHE", str(tmp_path / "cache"))
    real = copy_classes(digits100, tmp_path / "real", 0, 5)
    synthetic = write_fake_synth(digits100, tmp_path / "synthetic", per_class=3)
    (tmp_path / "bad-metrics.json").write_text("{}")
    return tmp_path, real, synthetic, tiny_run


def _failures(tmp: Path, real: Path, synthetic: Path, run: Path) -> list[list[str]]:
    missing = str(tmp / "missing")
    out = str(tmp / "new" / "out")
    return [
        ["inspect", missing],
        ["fit", missing, "--out", out, "--kimg", "0.01"],
        ["fit", str(real), "--out", out, "--config", missing + ".yaml"],
        ["fit", str(real), "--out", out, "--resume"],
        ["synth", missing, "--n", "4", "--out", out],
        ["synth", str(run), "--n", "4", "--out", out, "--dedup", "--dedup-real", missing],
        ["vary", missing, str(real), "--out", out],
        ["vary", str(run), missing, "--out", out],
        ["merge", "--real", missing, "--out", out],
        ["merge", "--real", str(real), "--synthetic", missing, "--out", out],
        ["merge", "--real", str(real), "--synthetic", str(synthetic), "--recipe", missing + ".yaml", "--out", out],
        ["merge", "--real", str(real), "--synthetic", str(synthetic), "--recipe", "nope", "--out", out],
        ["evaluate", "--real", str(real), "--synthetic", missing, "--out", out],
        ["evaluate", "--real", str(real), "--synthetic", str(synthetic), "--recipe", "nope", "--out", out],
        ["evaluate", "--real", str(real), "--synthetic", str(synthetic), "--features", missing + ".pth", "--out", out],
        ["evaluate", "--real", str(real), "--synthetic", str(synthetic), "--inception-weights", missing, "--out", out],
        ["evaluate", "--real", str(real), "--synthetic", str(synthetic), "--downstream", "--test", missing,
         "--out", out],
        ["evaluate", "--real", str(real), "--synthetic", str(synthetic), "--probe", missing, "--out", out],
        ["report", missing],
        ["report", str(run), "--real", str(real), "--synthetic", missing, "--out", out + ".html"],
        ["report", str(run), "--metrics", str(tmp / "bad-metrics.json"), "--out", out + ".html"],
        ["recipes", "show", missing + ".yaml"],
    ]


def test_a_failure_on_a_missing_input_changes_nothing(workspace):
    tmp, real, synthetic, run = workspace
    runner = CliRunner()
    for args in _failures(tmp, real, synthetic, run):
        before = _tree(tmp, run)
        result = runner.invoke(app, args)
        assert result.exit_code != 0, (args, result.output)
        assert "Traceback" not in result.output, (args, result.output)
        assert _tree(tmp, run) == before, f"`augment-gan {' '.join(args)}` changed the file system"


def test_evaluate_rejects_a_bad_recipe_or_weights_file_before_reading_anything(workspace):
    tmp, real, synthetic, _ = workspace
    for extra in (["--recipe", "nope"], ["--features", str(tmp / "missing.pth")]):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "augment_gan", "evaluate", "--real", str(real), "--synthetic",
                               str(synthetic), *extra], capture_output=True, text=True, cwd=tmp)
        seconds = time.perf_counter() - start
        assert proc.returncode != 0 and proc.stderr.startswith("Error: "), proc.stderr
        assert "decoding" not in proc.stderr and not (tmp / "cache").exists()
        assert seconds < 1.5, f"{extra}: {seconds:.2f} s"  # python + click + numpy start-up, no torch


# ---------------------------------------------------------------------------------------------------------
# --quiet and --verbose.

def test_merge_quiet_prints_no_warning_and_no_progress(workspace):
    tmp, real, _, _ = workspace
    # Synthetic classes 0-4 for a real folder of 0-9: a warning (classes without synthetic images), and
    # one synthetic image per class for about 7 outputs: more warnings (reused images).
    synthetic = write_fake_synth(real, tmp / "few", classes=[str(d) for d in range(5)], per_class=1, size=32)
    loud = CliRunner().invoke(app, ["merge", "--real", str(real), "--synthetic", str(synthetic), "--copies", "4",
                                    "--out", str(tmp / "m1")])
    assert loud.exit_code == 0, loud.output
    assert "warning: synthetic set" in loud.stderr and "warning: class 0: 1 synthetic images" in loud.stderr
    # The whole process, start-up included, with --quiet: nothing on stderr.
    quiet = subprocess.run([sys.executable, "-m", "augment_gan", "merge", "--real", str(real), "--synthetic",
                            str(synthetic), "--copies", "4", "--out", str(tmp / "m2"), "--quiet"],
                           capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert quiet.stdout.startswith("wrote ")  # the result still goes to stdout


def test_quiet_and_verbose_set_the_log_level_and_are_restored(workspace):
    import logging

    tmp, real, synthetic, _ = workspace
    runner = CliRunner()
    logger = logging.getLogger("augment_gan")
    level = logger.level
    result = runner.invoke(app, ["inspect", str(real), "--verbose", "--no-cache"])
    assert result.exit_code == 0, result.output
    assert logger.level == level and not any(type(h).__name__ == "_Handler" for h in logger.handlers)
    result = runner.invoke(app, ["inspect", str(real), "--quiet", "--verbose"])
    assert result.exit_code == 2 and "contradict" in result.output


# ---------------------------------------------------------------------------------------------------------
# fit --print-config.

def test_print_config_lists_every_field_with_its_doc_and_loads_back(tmp_path, digits100):
    from dataclasses import fields

    from augment_gan.checkpoint import list_checkpoints, read_meta
    from augment_gan.config import TrainConfig, load_config_file
    from fixtures_run import TINY_NETS

    result = CliRunner().invoke(app, ["fit", "--print-config"])
    assert result.exit_code == 0, result.output
    text = result.output
    data = yaml.safe_load(text)
    assert list(data) == [f.name for f in fields(TrainConfig)]
    assert TrainConfig.from_dict(data) == TrainConfig()
    lines = text.splitlines()
    for f in fields(TrainConfig):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{f.name}:"))
        assert lines[at - 1].startswith("# ") and len(lines[at - 1]) > 4, f"{f.name} has no doc comment"
    # The file is a valid --config: it loads back, and options on the command line still win.
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert TrainConfig.from_dict(load_config_file(path)) == TrainConfig()
    # Edited as a user would (tiny networks so the test trains in a second), it drives a real `fit --config`.
    for name, value in TINY_NETS.items():
        text = text.replace(f"\n{name}: {getattr(TrainConfig(), name)}\n", f"\n{name}: {value}\n")
    path.write_text(text.replace("\nbatch_size: 32\n", "\nbatch_size: 16\n"))
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["fit", str(digits100), "--config", str(path), "--kimg", "0.016", "--out",
                                      str(run), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    config = read_meta(list_checkpoints(run)[-1]).config
    assert config == TrainConfig(kimg=0.016, minutes=None, batch_size=16, **TINY_NETS)


# ---------------------------------------------------------------------------------------------------------
# Recipes to and from albumentations.

@pytest.mark.parametrize("name", ["heavy", "light", "none", "standard"])
@pytest.mark.parametrize("part", ["real", "synthetic"])
def test_recipes_show_part_is_read_by_albumentations_and_its_save_by_load_recipe(tmp_path, name, part):
    import albumentations as A
    import numpy as np
    import torch

    from augment_gan.pipeline import seed_pipeline
    from augment_gan.recipes import DEFAULT_MIX, Recipe, load_recipe

    result = CliRunner().invoke(app, ["recipes", "show", name, "--part", part])
    assert result.exit_code == 0, result.output
    exported = tmp_path / f"{name}-{part}.yaml"
    exported.write_text(result.output)
    pipeline = A.load(str(exported), data_format="yaml")
    images = [np.random.default_rng(i).integers(0, 256, (32, 32, c), dtype=np.uint8) for i, c in ((0, 1), (1, 3))]
    expected = load_recipe(name, part=part, seed=5)
    wanted = [expected(image) for image in images]
    seed_pipeline(pipeline, 5)
    for image, want in zip(images, wanted):
        assert torch.equal(pipeline(image=Recipe._as_array(image))["image"], want)

    saved = tmp_path / "saved.yaml"
    A.save(pipeline, str(saved), data_format="yaml")
    for which in ("real", "synthetic"):  # an albumentations file is one pipeline for both
        recipe = load_recipe(saved, part=which, seed=5)
        assert {"use_synthetic": recipe.use_synthetic, "synthetic_ratio": recipe.synthetic_ratio} == DEFAULT_MIX
        for image, want in zip(images, wanted):
            assert torch.equal(recipe(image), want)


def test_library_calls_print_nothing_on_stdout(workspace, capfd):
    import augment_gan as ag

    tmp, real, synthetic, run = workspace
    capfd.readouterr()
    ag.inspect(real, ag.ReadOptions(resolution=32))
    synth_out = tmp / "synth-out"
    ag.synth(run, synth_out, n=20, device="cpu")
    ag.vary(run, real / "3", tmp / "vary-out", n=1, device="cpu", class_name="3")
    ag.merge(real, synthetic, tmp / "merged", "standard", resolution=32)
    ag.evaluate(real, synth_out, ag.EvaluateConfig(feature_steps=5, downstream=True, seeds=1, steps=5, kid_subsets=5))
    captured = capfd.readouterr()
    assert captured.out == "", captured.out
    assert "downstream classifiers" in captured.err  # progress goes to stderr
