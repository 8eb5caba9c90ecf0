"""Few labels, many images: `fit --labels` (pseudo-labels), `synth --label-with`, and the D probe's random floor."""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from augment_gan import labelwith
from augment_gan.checkpoint import load_checkpoint, read_meta
from augment_gan.cli import app
from augment_gan.config import TrainConfig
from augment_gan.errors import UserError
from augment_gan.evaluate import EvaluateConfig, format_result
from augment_gan.pseudolabel import PSEUDO_LABELS, LabelerConfig, PseudoLabels
from augment_gan.synth import SynthConfig, synth
from augment_gan.train import fit
from fakesynth import copy_classes

pytest_plugins = ["fixtures_run"]  # tiny_run (conditional), uncond_run (unconditional), digits100

CLASSES = ("0", "1", "7")


def tiny(**options) -> TrainConfig:
    """A few steps of the tiny networks (fixtures_run is imported here, after pytest loaded it as a plugin)."""
    from fixtures_run import TINY_NETS

    return TrainConfig(**{"resolution": 32, "kimg": 0.032, "minutes": None, "batch_size": 8, **TINY_NETS, **options})


LABELER = LabelerConfig(steps=40, held_out=0.3)


@pytest.fixture(scope="module")
def pool(shared_data, tmp_path_factory) -> dict[str, Path]:
    """A labeled folder (6 digits of each of 0, 1, 7) and an unlabeled flat folder (10 other digits of each, plus
    a copy of one labeled image under another name)."""
    root = tmp_path_factory.mktemp("pool")
    labeled = copy_classes(shared_data / "mnist", root / "labeled", 0, 6, classes=CLASSES)
    unlabeled = root / "unlabeled"
    unlabeled.mkdir()
    for c in CLASSES:
        for f in sorted((shared_data / "mnist" / c).iterdir())[6:16]:
            shutil.copy(f, unlabeled / f.name)
    copy = sorted((labeled / "7").iterdir())[0]
    shutil.copy(copy, unlabeled / "also-labeled.png")
    return {"labeled": labeled, "unlabeled": unlabeled, "copy": Path("7") / copy.name}


def _labeled_variant(pool: dict[str, Path], tmp_path: Path, name: str, change) -> Path:
    """A copy of the labeled folder with `change(class, image) -> image or None` (None: leave the class out)."""
    out = tmp_path / name
    for c in CLASSES:
        for f in sorted((pool["labeled"] / c).iterdir()):
            image = change(c, Image.open(f))
            if image is not None:
                (out / c).mkdir(parents=True, exist_ok=True)
                image.save(out / c / f.name)
    return out


# ----------------------------------------------------------------------------------------------------
# fit --labels

def test_fit_with_labels_trains_a_conditional_run_on_labeled_and_confident_images(pool, tmp_path):
    run = tmp_path / "run"
    path = fit(pool["unlabeled"], tiny(), run, device="cpu", progress=False, labels=pool["labeled"],
               labeler=dataclasses.replace(LABELER, confidence=0.6))
    meta = read_meta(path)
    assert meta.conditional and list(meta.classes) == list(CLASSES)
    record = json.loads((run / PSEUDO_LABELS).read_text())
    pseudo = PseudoLabels.read(run / PSEUDO_LABELS)
    # The copy of a labeled image is trained on once, as the labeled one; every other unlabeled image has a label.
    assert record["duplicates"] == {"also-labeled.png": pool["copy"].as_posix()}
    assert set(record["labels"]) == {p.name for p in pool["unlabeled"].iterdir()} - {"also-labeled.png"}
    for entry in record["labels"].values():
        assert entry["class"] in CLASSES and 0 <= entry["confidence"] <= 1
        assert entry["kept"] == (entry["confidence"] >= 0.6)
    kept = pseudo.kept_counts()
    info = meta.data.labels
    assert info is not None and info.root == str(pool["labeled"].resolve()) and info.confidence == 0.6
    assert info.labeled_images == 18 and info.pseudo_counts == kept and 0 < sum(kept) <= 30
    assert 0.0 <= info.classifier_accuracy <= 1.0 and record["classifier"]["held_out"]["images"] == 6
    assert meta.data.images == 18 + sum(kept) and sum(meta.data.class_counts) == meta.data.images
    assert meta.data.root == str(pool["unlabeled"].resolve())
    assert json.loads((run / "config.json").read_text())["data"]["labels"]["pseudo_counts"] == list(kept)
    # Most pseudo-labels name the digit the file really shows (MNIST file names start with it).
    right = [f.split("_")[0] == e["class"] for f, e in record["labels"].items() if e["kept"]]
    assert np.mean(right) >= 0.7

    # --resume reads the labels back, never labels again: an edited record is what the run trains on.
    record["labels"] = {f: {**e, "confidence": 1.0 if i == 0 else 0.0}
                        for i, (f, e) in enumerate(record["labels"].items())}
    (run / PSEUDO_LABELS).write_text(json.dumps(record))
    resumed = fit(pool["unlabeled"], tiny(kimg=0.064), run, device="cpu", progress=False,
                  resume=True, labels=pool["labeled"], labeler=dataclasses.replace(LABELER, confidence=0.6))
    meta = read_meta(resumed)
    assert meta.step == 8 and meta.data.images == 19 and sum(meta.data.labels.pseudo_counts) == 1
    assert json.loads((run / PSEUDO_LABELS).read_text())["labels"] == record["labels"]  # not rewritten

    # A resumed run takes the same --labels and threshold it started with.
    more = tiny(kimg=0.1)
    with pytest.raises(UserError, match="pass it again"):
        fit(pool["unlabeled"], more, run, device="cpu", progress=False, resume=True)
    with pytest.raises(UserError, match="--label-confidence 0.9"):
        fit(pool["unlabeled"], more, run, device="cpu", progress=False, resume=True, labels=pool["labeled"],
            labeler=LABELER)
    (run / PSEUDO_LABELS).unlink()
    with pytest.raises(UserError, match="pseudo_labels.json is missing"):
        fit(pool["unlabeled"], more, run, device="cpu", progress=False, resume=True, labels=pool["labeled"],
            labeler=dataclasses.replace(LABELER, confidence=0.6))


def test_checkpoint_data_info_reads_old_and_new_metadata():
    from augment_gan.runmeta import DataInfo, LabelsInfo

    old = {"root": "/d", "images": 5, "channels": 1, "classes": ["a", "b"], "skipped": 0, "class_counts": [2, 3]}
    assert DataInfo.from_dict(old).labels is None and "labels" not in DataInfo.from_dict(old).to_dict()
    new = DataInfo(root="/d", images=9, channels=1, classes=("a", "b"), class_counts=(4, 5),
                   labels=LabelsInfo(root="/l", confidence=0.9, labeled_images=4, pseudo_counts=(2, 3),
                                     classifier_accuracy=0.75))
    assert DataInfo.from_dict(json.loads(json.dumps(new.to_dict()))) == new


def test_resuming_a_plain_run_with_labels_is_refused(pool, tmp_path):
    run = tmp_path / "run"
    fit(pool["labeled"], tiny(), run, device="cpu", progress=False)
    with pytest.raises(UserError, match="started without --labels"):
        fit(pool["unlabeled"], tiny(kimg=0.064), run, device="cpu", progress=False,
            resume=True, labels=pool["labeled"], labeler=LABELER)


def test_bad_labeled_folders_are_one_line_errors_before_any_work(pool, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted((pool["labeled"] / "0").iterdir()):
        shutil.copy(f, flat / f.name)
    one_class = _labeled_variant(pool, tmp_path, "one", lambda c, im: im if c == "0" else None)
    colour = _labeled_variant(pool, tmp_path, "colour", lambda c, im: Image.merge(
        "RGB", (im.convert("L"), im.convert("L").point(lambda v: v // 2), im.convert("L"))))
    tiny = _labeled_variant(pool, tmp_path, "tiny", lambda c, im: im.resize((6, 6)))
    cases = [(tmp_path / "missing", "--labels folder not found"), (flat, "has no class subfolders"),
             (one_class, "has one class (0); labelling needs at least two"),
             (colour, "has colour images but the training folder"), (tiny, "is 6×6 px")]
    runner = CliRunner()
    for labels, message in cases:
        out = tmp_path / f"run-{labels.name}"
        result = runner.invoke(app, ["fit", str(pool["unlabeled"]), "--labels", str(labels), "--out", str(out),
                                     "--kimg", "0.032", "--quiet"])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not out.exists()                      # nothing trained, no run folder left behind
    result = runner.invoke(app, ["fit", str(pool["unlabeled"]), "--labels", str(pool["labeled"]), "--unconditional",
                                 "--out", str(tmp_path / "u"), "--quiet"])
    assert result.exit_code == 1 and "drop --unconditional" in result.output
    result = runner.invoke(app, ["fit", str(pool["unlabeled"]), "--label-confidence", "0.5",
                                 "--out", str(tmp_path / "c"), "--quiet"])
    assert result.exit_code == 1 and "--label-confidence needs --labels" in result.output


# ----------------------------------------------------------------------------------------------------
# synth --label-with

@pytest.fixture
def quick_labeler(monkeypatch):
    """synth's labelling classifier with few steps (its training is the same code as fit's)."""
    monkeypatch.setattr(labelwith, "LabelerConfig", functools.partial(LabelerConfig, steps=30))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def test_label_with_writes_n_confident_labeled_images(quick_labeler, uncond_run, pool, tmp_path):
    options = dict(n=12, label_with=str(pool["labeled"]), label_confidence=0.4, progress=False)
    a = synth(uncond_run, tmp_path / "a", SynthConfig(**options))
    assert a.images == a.written == 12 and a.dropped_confidence >= 0 and a.existing == 0
    rows = _rows(tmp_path / "a")
    kept = [r for r in rows if r["kept"]]
    assert [r["index"] for r in kept] == list(range(12)) and len(rows) == 12 + a.dropped_confidence
    assert sorted(r["latent"] for r in rows) == list(range(len(rows)))     # candidates taken in order
    for r in rows:
        assert r["class"] == CLASSES[r["label"]] and isinstance(r["confidence"], float)
        if r["kept"]:
            assert r["confidence"] >= 0.4 and r["file"] == f"{r['class']}/{r['index']:06d}.png"
            assert (tmp_path / "a" / r["file"]).is_file()
        else:
            assert r["confidence"] < 0.4 and r["file"] is None and r["filter"] == "label-confidence"
    settings = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert settings["label_with"]["features"] == "classifier" and settings["classes"] == list(CLASSES)
    # Plain synth rows carry no confidence key.
    synth(uncond_run, tmp_path / "plain", SynthConfig(n=3, progress=False))
    assert all("confidence" not in r for r in _rows(tmp_path / "plain"))

    # Deterministic: the same command (here with another generator batch) writes the same bytes.
    b = synth(uncond_run, tmp_path / "b", SynthConfig(**options, batch_size=5, lanes=2))
    assert b.images == 12 and _files(tmp_path / "a") == _files(tmp_path / "b")

    # Resumable: a rerun finds what is done; lost images are written again, the same bytes.
    before = _files(tmp_path / "b")
    again = synth(uncond_run, tmp_path / "b", SynthConfig(**options))
    assert again.written == 0 and again.existing == 12 and _files(tmp_path / "b") == before
    for r in kept[-3:]:
        (tmp_path / "b" / r["file"]).unlink()
    (tmp_path / "b" / "manifest.jsonl").rename(tmp_path / "b" / "manifest.jsonl.partial")  # as a killed run leaves
    resumed = synth(uncond_run, tmp_path / "b", SynthConfig(**options))
    assert resumed.written == 3 and resumed.existing == 9 and _files(tmp_path / "b") == before

    # Other settings need --overwrite, as for synth.
    with pytest.raises(UserError, match="other settings"):
        synth(uncond_run, tmp_path / "b", SynthConfig(**{**options, "seed": 1}))
    synth(uncond_run, tmp_path / "b", SynthConfig(**{**options, "seed": 1}, overwrite=True))
    assert json.loads((tmp_path / "b" / "synth.json").read_text())["seed"] == 1


def test_label_with_refuses_conditional_runs_and_other_counts(quick_labeler, tiny_run, uncond_run, pool, tmp_path):
    with pytest.raises(UserError, match="plain synth already labels"):
        synth(tiny_run, tmp_path / "o", SynthConfig(n=4, label_with=str(pool["labeled"]), progress=False))
    assert not (tmp_path / "o").exists()
    for extra, name in ((dict(keep_top=0.5), "--keep-top"), (dict(dedup=True), "--dedup"),
                        (dict(shard=(0, 2)), "--shard"), (dict(format="tar"), "--format tar")):
        with pytest.raises(UserError, match=f"does not take {name}"):
            SynthConfig(n=4, label_with=str(pool["labeled"]), **extra)
    with pytest.raises(UserError, match="needs --label-with"):
        SynthConfig(n=4, label_confidence=0.5)
    runner = CliRunner()
    result = runner.invoke(app, ["synth", str(tiny_run), "--n", "4", "--label-with", str(pool["labeled"]),
                                 "--out", str(tmp_path / "c"), "--quiet"])
    assert result.exit_code == 1 and "plain synth already labels" in result.output
    result = runner.invoke(app, ["synth", str(uncond_run), "--n", "4", "--label-with", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "c"), "--quiet"])
    assert result.exit_code == 1 and "--label-with folder not found" in result.output
    result = runner.invoke(app, ["synth", str(uncond_run), "--n", "4", "--label-with", str(pool["labeled"]),
                                 "--label-confidence", "0.4", "--out", str(tmp_path / "cli"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "4 images" in result.output and "--label-with dropped" in result.output
    assert len(list((tmp_path / "cli").rglob("*.png"))) == 4


# ----------------------------------------------------------------------------------------------------
# evaluate --probe: trained vs random-init D

def test_probe_reports_trained_and_random_init_discriminator(tiny_run, digits100, tmp_path):
    from augment_gan.evaluate import evaluate

    fake = tmp_path / "fake"
    copy_classes(digits100, fake, 0, 3)
    result = evaluate(digits100, fake, EvaluateConfig(features="pixels", probe=str(tiny_run), probe_steps=30),
                      progress=False, log=lambda m: None)
    probe = result["probe"]
    assert 0 <= probe["trained_d"] <= 1 and 0 <= probe["random_d"] <= 1
    assert probe["random_d_seed"] == load_checkpoint(tiny_run).config.seed
    assert probe["gain"] == pytest.approx(probe["trained_d"] - probe["random_d"])
    table = format_result(result)
    lines = {line.split()[0] + " " + line.split()[1]: line for line in table.splitlines() if line.startswith("  ")}
    assert f"{probe['trained_d']:.1%}" in lines["trained D"] and f"{probe['random_d']:.1%}" in lines["random-init D"]
    assert f"{100 * probe['gain']:+.1f} pp" in lines["trained -"]
