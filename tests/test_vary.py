"""`augment-gan vary`: variations of real images through the latent encoder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from augment_gan.checkpoint import load_checkpoint
from augment_gan.cli import app
from augment_gan.errors import UserError
from augment_gan.vary import VaryConfig, vary

pytest_plugins = ["fixtures_run"]  # tiny_run, uncond_run, digits100 (session-scoped)


@pytest.fixture(scope="module")
def ckpt(tiny_run):
    return load_checkpoint(tiny_run)


@pytest.fixture(scope="module")
def source(digits100, tmp_path_factory) -> Path:
    """A labeled folder: 3 real digits of classes 1 and 7."""
    root = tmp_path_factory.mktemp("vary-source")
    for c in ("1", "7"):
        (root / c).mkdir()
        for f in sorted((digits100 / c).iterdir())[:3]:
            shutil.copy(f, root / c / f.name)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_labeled_folder_keeps_classes_and_is_deterministic(ckpt, source, tmp_path):
    s = vary(ckpt, source, tmp_path / "a", VaryConfig(n=4, sigma=0.5, progress=False))
    assert s.sources == 6 and s.images == s.written == 24
    names = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.png"))
    stems = sorted(f"{c}/{f.stem}_{k}.png" for c in ("1", "7") for f in (source / c).iterdir() for k in range(4))
    assert names == stems
    rows = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and all(r["label"] == ckpt.classes.index(r["class"]) for r in rows)
    assert all(r["file"].startswith(r["class"] + "/") and r["source"].startswith(r["class"] + "/") for r in rows)
    # Same bytes on a second run, with another batch size; a rerun resumes.
    vary(ckpt, source, tmp_path / "b", VaryConfig(n=4, sigma=0.5, batch_size=3, progress=False))
    assert tree(tmp_path / "a") == tree(tmp_path / "b")
    again = vary(ckpt, source, tmp_path / "a", VaryConfig(n=4, sigma=0.5, progress=False))
    assert again.written == 0 and again.existing == 24
    # The k variations of one source differ; sigma 0 gives the reconstruction, the same every time.
    one = sorted((tmp_path / "a" / "7").glob("*.png"))[:4]
    assert len({pixels(p).tobytes() for p in one}) == 4
    vary(ckpt, source, tmp_path / "rec", VaryConfig(n=3, sigma=0.0, progress=False))
    recs = sorted((tmp_path / "rec" / "7").glob("*.png"))[:3]
    assert len({pixels(p).tobytes() for p in recs}) == 1
    # Other settings need --overwrite.
    with pytest.raises(UserError, match="other settings"):
        vary(ckpt, source, tmp_path / "a", VaryConfig(n=4, sigma=0.9, progress=False))
    over = vary(ckpt, source, tmp_path / "a", VaryConfig(n=4, sigma=0.9, overwrite=True, progress=False))
    assert over.written == 24 and tree(tmp_path / "a") != tree(tmp_path / "b")
    fewer = vary(ckpt, source, tmp_path / "a", VaryConfig(n=2, sigma=0.9, overwrite=True, progress=False))
    assert fewer.images == 12 and len(list((tmp_path / "a").rglob("*.png"))) == 12  # old _2, _3 removed


def test_variations_grow_a_labeled_dataset(ckpt, source, tmp_path):
    from augment_gan.datasets import SyntheticImageFolder

    vary(ckpt, source, tmp_path / "v", VaryConfig(n=2, progress=False))
    data = SyntheticImageFolder(tmp_path / "v", class_to_idx={"1": 0, "7": 1})
    assert len(data) == 12 and sorted(set(data.targets)) == [0, 1]


def test_single_image_needs_a_class_on_a_conditional_run(ckpt, source, tmp_path):
    image = sorted((source / "7").iterdir())[0]
    with pytest.raises(UserError, match="--class"):
        vary(ckpt, image, tmp_path / "x", VaryConfig(n=2, progress=False))
    s = vary(ckpt, image, tmp_path / "x", VaryConfig(n=2, class_name="7", progress=False))
    assert s.images == 2 and (tmp_path / "x" / "7" / f"{image.stem}_1.png").is_file()
    with pytest.raises(UserError, match="not classes of the checkpoint"):
        vary(ckpt, image, tmp_path / "y", VaryConfig(n=2, class_name="cat", progress=False))
    with pytest.raises(UserError, match="--class is for an unlabeled source"):
        vary(ckpt, source, tmp_path / "z", VaryConfig(n=2, class_name="7", progress=False))


def test_unconditional_run_keeps_the_source_classes(uncond_run, source, tmp_path):
    s = vary(uncond_run, source, tmp_path / "u", VaryConfig(n=2, progress=False))
    rows = [json.loads(line) for line in (tmp_path / "u" / "manifest.jsonl").read_text().splitlines()]
    assert s.images == 12 and {r["class"] for r in rows} == {"1", "7"}
    assert {r["label"] for r in rows if r["class"] == "7"} == {1}      # index in the source's classes
    flat = vary(uncond_run, sorted((source / "1").iterdir())[0], tmp_path / "f", VaryConfig(n=2, progress=False))
    assert flat.images == 2 and len(list((tmp_path / "f").glob("*_?.png"))) == 2


def test_clashing_output_names_are_an_error(uncond_run, source, tmp_path):
    clash = tmp_path / "clash" / "7"
    clash.mkdir(parents=True)
    first = sorted((source / "7").iterdir())[0]
    shutil.copy(first, clash / "a.png")
    Image.open(first).convert("L").save(clash / "a.jpg")
    with pytest.raises(UserError, match="would both write 7/a_0.png"):
        vary(uncond_run, tmp_path / "clash", tmp_path / "out", VaryConfig(n=1, progress=False))


def test_cli(tiny_run, source, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["vary", str(tiny_run), str(source), "--n", "2", "--out", str(tmp_path / "c"),
                                 "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["images"] == 12
    result = runner.invoke(app, ["vary", str(tiny_run), str(tmp_path / "missing"), "--out", str(tmp_path / "d")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and "not found" in lines[0]
