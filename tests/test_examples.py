"""The example training script runs end to end with a tiny budget."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fakesynth import write_fake_synth, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_classifier.py"
DIGITS = ROOT / "examples" / "digits"


@pytest.fixture(scope="module")
def fake_synth_folder(shared_data, tmp_path_factory) -> Path:
    """A `synth`-style folder holding real MNIST digits (not examples/digits) at 32 px, 20 per class."""
    return write_fake_synth(shared_data / "mnist", tmp_path_factory.mktemp("synth") / "digits", per_class=20,
                            rejected_per_class=1, size=32)


def _table(output: str) -> dict[str, tuple[int, float]]:
    rows = {}
    for line in output.splitlines():
        match = re.match(r"\| (real[^|]*) \| ([\d,]+) \| ([\d.]+) \|", line)
        if match:
            rows[match.group(1)] = (int(match.group(2).replace(",", "")), float(match.group(3)))
    return rows


def test_train_classifier_real_vs_synthetic(fake_synth_folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--real", str(DIGITS), "--synthetic", str(fake_synth_folder),
         "--recipe", "standard", "--steps", "8", "--batch-size", "16", "--threads", "1", "--seed", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _table(result.stdout)
    assert list(rows) == ["real only", "real + synthetic (25%)"], result.stdout
    assert rows["real only"][0] == 0 and rows["real + synthetic (25%)"][0] == 200
    assert all(0.0 <= accuracy <= 1.0 for _, accuracy in rows.values())
    assert "350 real training images, 150 test images, 10 classes" in result.stderr


def test_train_classifier_with_an_on_the_fly_generator(tmp_path, capsys):
    # In-process (a second interpreter start costs more than the run): the --generator path end to end.
    checkpoint = write_tiny_checkpoint(tmp_path / "run", [str(i) for i in range(10)])
    spec = importlib.util.spec_from_file_location("train_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--real", str(DIGITS), "--generator", str(tmp_path / "run"), "--n", "40", "--recipe", "light",
                 "--steps", "3", "--batch-size", "8", "--test-split", "0.1", "--ratio", "0.5"])
    rows = _table(capsys.readouterr().out)
    assert rows["real + synthetic (50%)"][0] == 40 and checkpoint.exists()
