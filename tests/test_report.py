"""`report` on a fake run directory (a generated log.jsonl and a grid of real digits)."""
from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from augment_gan.cli import app
from augment_gan.errors import UserError
from augment_gan.report import build_report, read_log, write_report


@pytest.fixture
def run_dir(shared_data, tmp_path) -> Path:
    """What `fit` leaves behind: log.jsonl (with a cut-off last line), two grids, a checkpoint JSON."""
    run = tmp_path / "run"
    (run / "grids").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    lines = []
    for i in range(1, 41):
        lines.append(json.dumps({
            "step": 20 * i, "kimg": 1.28 * i, "time_s": 3.0 * i, "img_per_s": 400.0, "p": min(0.02 * i, 0.5),
            "rt": 0.5 + 0.01 * np.sin(i), "loss_d": 1.5 - 0.01 * i, "loss_g": 0.5 + 0.01 * i,
            "loss_rot_d": 1.3 / i, "loss_rot_g": 1.2 / i, "loss_completion": 0.2, "loss_encoder": 0.9}))
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 820, "kimg"')
    # A conditional grid: one row per class, 8 real digits each.
    tiles = [np.asarray(Image.open(f).convert("L").resize((32, 32)))
             for d in range(10) for f in sorted((shared_data / "mnist" / str(d)).iterdir())[:8]]
    grid = np.vstack([np.hstack(tiles[r * 8:(r + 1) * 8]) for r in range(10)])
    for step in (400, 800):
        Image.fromarray(grid).save(run / "grids" / f"grid-{step:08d}.png")
    meta = {"config": {"resolution": 32, "batch_size": 64, "loss": "hinge", "ada_target": 0.6},
            "conditional": True, "classes": [str(d) for d in range(10)], "channels": 1, "step": 800}
    (run / "checkpoints" / "ckpt-00000800.json").write_text(json.dumps(meta))
    return run


def _embedded_pngs(page: str) -> list[Image.Image]:
    import io

    return [Image.open(io.BytesIO(base64.b64decode(m)))
            for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_embeds_grids_and_curves(run_dir):
    records, bad = read_log(run_dir / "log.jsonl")
    assert len(records) == 40 and bad == 1  # the line a running fit is still writing is skipped

    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    out = run_dir / "report.html"
    assert res.stdout.strip() == str(out)
    page = out.read_text()
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched from anywhere
    images = _embedded_pngs(page)
    # Latest grid, two progress grids, one curves figure.
    assert len(images) == 4
    assert images[0].size == (256, 320)
    assert images[3].size[0] > 600  # three panels of curves
    assert "one row per class: 0, 1, 2" in page
    assert "unreadable log line" in page
    assert "Synthetic data" not in page


def test_report_refuses_to_overwrite_and_checks_the_run(run_dir, tmp_path):
    out = tmp_path / "r.html"
    write_report(run_dir, out)
    res = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out)])
    assert res.exit_code == 1 and "exists; pass --overwrite" in res.output
    res = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("r.html")] == ["r.html"]  # no temp left

    with pytest.raises(UserError, match="not a training run"):
        build_report(tmp_path)
    with pytest.raises(UserError, match="both --real and --synthetic"):
        write_report(run_dir, tmp_path / "x.html", real=tmp_path)


def test_report_includes_metrics_from_evaluate(run_dir, shared_data, tmp_path):
    # A metrics.json + pairs.png as `evaluate --out` writes them (computed here on two digit sets).
    from augment_gan.evaluate import EvaluateConfig, evaluate

    for name, (a, b) in {"real": (0, 15), "synth": (15, 30)}.items():
        for d in range(10):
            (tmp_path / name / str(d)).mkdir(parents=True)
            for f in sorted((shared_data / "mnist" / str(d)).iterdir())[a:b]:
                shutil.copy(f, tmp_path / name / str(d) / f.name)
    evaluate(tmp_path / "real", tmp_path / "synth", EvaluateConfig(features="random"),
             out_dir=tmp_path / "eval", progress=False, log=lambda m: None)

    res = CliRunner().invoke(app, ["report", str(run_dir), "--metrics", str(tmp_path / "eval" / "metrics.json")])
    assert res.exit_code == 0, res.output
    page = (run_dir / "report.html").read_text()
    assert "Fréchet distance" in page and "random-cnn (untrained, seed 0)" in page
    assert "Nearest neighbours" in page
    assert len(_embedded_pngs(page)) == 5  # + the pairs image


def test_missing_matplotlib_is_one_clear_line(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import now raises ImportError
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 1
    assert "pip install matplotlib" in res.output and "Traceback" not in res.output
    assert not (run_dir / "report.html").exists()
