"""`augment-gan inspect`: the done-when counts on the real sets, the bad corpus, one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from augment_gan.cli import app
from badfiles import write_bad_corpus


def _inspect_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_emoji_twitter_full_set(shared_data):
    summary = _inspect_json(str(shared_data / "emoji-twitter"))
    assert summary["images"] == 1906 and summary["skipped"] == []
    assert summary["labeled"] and len(summary["classes"]) == 9
    assert summary["classes"]["activities"] == 85 and summary["classes"]["people-body"] == 386
    assert summary["channels"] == 3 and summary["channel_decision"] == "rgb"
    assert summary["sizes"] == {"64x64": 1906} and summary["modes"] == {"RGBA": 1734, "P": 172}


def test_mnist_full_set(shared_data):
    summary = _inspect_json(str(shared_data / "mnist"), "--resolution", "32")
    assert summary["images"] == 6000 and summary["skipped"] == []
    assert summary["classes"] == {str(d): 600 for d in range(10)}
    assert summary["channels"] == 1 and summary["channel_decision"] == "grayscale"
    assert summary["sizes"] == {"28x28": 6000} and summary["modes"] == {"L": 6000}


def test_text_report_on_the_bad_corpus(tmp_path):
    expected = write_bad_corpus(tmp_path / "corpus")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "corpus"), "--resolution", "32"])
    assert result.exit_code == 0, result.output
    good = sum(e.kind == "ok" for e in expected.values())
    bad = [name for name, e in expected.items() if e.kind == "skip"]
    out = result.stdout
    assert f"{good} decodable, {len(bad)} skipped" in out
    assert "labels     none" in out and "channels   3 (RGB" in out
    skipped_section = out.split("skipped:\n", 1)[1]
    for name in bad:
        assert f"  {name}: " in skipped_section
    for name, e in expected.items():
        if e.kind == "ignored":
            assert name not in out


def test_json_matches_the_text_report(shared_data, tmp_path):
    folder = tmp_path / "digits"
    for digit in ("1", "7"):
        (folder / digit).mkdir(parents=True)
        for file in sorted((shared_data / "mnist" / digit).iterdir())[:4]:
            shutil.copy2(file, folder / digit / file.name)
    summary = _inspect_json(str(folder), "--resolution", "32", "--no-cache")
    assert summary["classes"] == {"1": 4, "7": 4} and summary["cache_file"] is None
    text = CliRunner().invoke(app, ["inspect", str(folder), "--resolution", "32"]).stdout
    assert "8 decodable, 0 skipped" in text and "channels   1 (grayscale" in text


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_one_line_error_without_traceback(tmp_path, kind):
    folder = tmp_path / "nope"
    if kind == "empty":
        folder.mkdir()
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")


def test_real_subprocess_error(tmp_path):
    script = Path(sys.executable).with_name("augment-gan")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "augment_gan"]
    proc = subprocess.run([*command, "inspect", str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: folder not found: {tmp_path / 'missing'}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bad_option_is_a_usage_error():
    result = CliRunner().invoke(app, ["inspect", ".", "--background", "chartreuse-ish"])
    assert result.exit_code == 2 and "--background" in result.output and "Traceback" not in result.output
