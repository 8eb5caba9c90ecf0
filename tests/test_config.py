"""Config values are checked by type when a config is built: from YAML, JSON, keywords or the command line."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from augment_gan.cli import app
from augment_gan.config import TrainConfig, load_config_file
from augment_gan.errors import UserError
from augment_gan.evaluate import EvaluateConfig
from augment_gan.synth import SynthConfig
from augment_gan.vary import VaryConfig


@pytest.mark.parametrize("yaml_text, message", [
    ('conditional: "no"', "conditional must be true or false, got 'no'"),
    ("g_channels: 12.5", "g_channels must be an integer, got 12.5"),
    ('seed: "7"', "seed must be an integer, got '7'"),
    ("minutes: .nan", "minutes must be a finite number or null, got nan"),
    ("kimg: .inf", "kimg must be a finite number or null, got inf"),
    ("checkpoint_minutes: -1", "checkpoint_minutes must be positive, got -1.0"),
    ("batch_size: true", "batch_size must be an integer, got True"),
    ("background: [255, 255]", "background must be a list of 3 integers"),
    ("background: [0, 0, 300]", "background must be three integers in 0..255"),
    ("diffaug: color", "diffaug must be a list of strings, got 'color'"),
    ("betas: [0.5, 1.5]", "betas must be two numbers in [0, 1)"),
    ("log_every: 0", "log_every must be >= 1"),
    ("seed: -3", "seed must be in [0, 2**63)"),
    ("min_channels: 64\nmax_channels: 32", "min_channels (64) must not exceed max_channels (32)"),
])
def test_train_config_rejects_wrong_types_and_values_when_loaded(tmp_path, yaml_text, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(UserError) as error:
        TrainConfig.from_dict(load_config_file(path))
    assert message in str(error.value)


def test_right_types_are_kept_and_numbers_normalised():
    config = TrainConfig.from_dict({"minutes": 5, "conditional": False, "background": [0, 0, 0],
                                    "diffaug": ["color"], "betas": [0, 0.9], "kimg": None})
    assert config.minutes == 5.0 and isinstance(config.minutes, float) and config.conditional is False
    assert config.background == (0, 0, 0) and config.diffaug == ("color",) and config.betas == (0.0, 0.9)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


@pytest.mark.parametrize("build, message", [
    (lambda: SynthConfig(n=10, seed="7"), "seed must be an integer, got '7'"),
    (lambda: SynthConfig(n=10.0), "n must be an integer or null, got 10.0"),
    (lambda: SynthConfig(n=10, truncation=float("nan")), "truncation must be a finite number, got nan"),
    (lambda: SynthConfig(n=10, dedup="yes"), "dedup must be true or false, got 'yes'"),
    (lambda: SynthConfig(n=10, shard=(0, "2")), "shard must be a list of 2 integers or null"),
    (lambda: SynthConfig(n=10, classes="3"), "classes must be a list of strings or null, got '3'"),
    (lambda: VaryConfig(sigma="0.5"), "sigma must be a finite number or null, got '0.5'"),
    (lambda: VaryConfig(overwrite=1), "overwrite must be true or false, got 1"),
    (lambda: VaryConfig(seed=-1), "--seed must be >= 0"),
    (lambda: EvaluateConfig(steps=1.5), "steps must be an integer, got 1.5"),
    (lambda: EvaluateConfig(downstream="no"), "downstream must be true or false, got 'no'"),
    (lambda: EvaluateConfig(synthetic_ratio=float("inf")), "synthetic_ratio must be a finite number or null"),
])
def test_the_other_configs_reject_wrong_types(build, message):
    with pytest.raises(UserError) as error:
        build()
    assert message in str(error.value)


def test_paths_are_accepted_where_strings_are_expected(tmp_path):
    assert SynthConfig(n=1, dedup=True, dedup_real=tmp_path).dedup_real == str(tmp_path)
    assert SynthConfig(n=1, classes=["3", "8"]).classes == ("3", "8")


def test_cli_reports_bad_values_in_one_line(tmp_path):
    runner = CliRunner()
    folder = tmp_path / "images"
    folder.mkdir()
    for args, message in [(["--minutes", "nan"], "minutes must be a finite number"),
                          (["--checkpoint-minutes", "-1"], "checkpoint_minutes must be positive")]:
        result = runner.invoke(app, ["fit", str(folder), "--out", str(tmp_path / "run"), *args])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "run").exists()
