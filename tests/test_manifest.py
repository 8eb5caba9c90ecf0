"""The manifest row type, the output-folder rule and the copy rule: the pieces synth, vary, merge and evaluate share."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from augment_gan.errors import UserError
from augment_gan.manifest import MANIFEST, VERSION, ManifestRow, read_manifest, write_manifest
from augment_gan.metrics import NearestReal, memorisation
from augment_gan.outputs import check_out_folder, clear_outputs


def test_rows_round_trip_and_old_rows_still_read(tmp_path):
    rows = [ManifestRow(file="3/000003.png", index=3, seed=0, class_name="3", label=3, checkpoint="0" * 64,
                        truncation=1.0, latent=3),
            ManifestRow(file=None, index=None, seed=0, class_name="3", label=3, checkpoint="0" * 64,
                        kept=False, filter="keep-top", latent=13, d_score=-1.5)]
    path = tmp_path / MANIFEST
    write_manifest(path, reversed(rows))                      # written in the manifest's order: kept first
    assert read_manifest(path) == rows
    assert all(json.loads(line)["version"] == VERSION for line in path.read_text().splitlines())
    first = path.read_bytes()
    write_manifest(path, rows)
    assert path.read_bytes() == first                          # bytes are a function of the rows
    # A row written before the version key existed reads as version 0, with the same meaning.
    path.write_text(json.dumps({"file": "a.png", "index": 0, "seed": 0, "class": None, "label": None,
                                "checkpoint": "x", "kept": True, "filter": None}) + "\n")
    (row,) = read_manifest(path)
    assert row.version == 0 and row.file == "a.png" and row.latent is None


@pytest.mark.parametrize("line,message", [
    ({"version": VERSION + 1, "file": "a.png", "class": None, "label": None, "kept": True}, "newer"),
    ({"file": "a.png", "class": None, "kept": True}, "missing key"),
    ({"file": "../a.png", "class": None, "label": None, "kept": True}, "relative path inside"),
])
def test_bad_rows_are_one_line_errors_or_skipped(tmp_path, line, message):
    path = tmp_path / MANIFEST
    path.write_text(json.dumps(line) + "\n" + "{cut")
    with pytest.raises(UserError, match=message):
        read_manifest(path)
    assert read_manifest(path, strict=False) == []             # synth's resume skips what it cannot use


def test_one_rule_for_output_folders(tmp_path):
    identity = lambda s: {"seed": s.get("seed")}  # noqa: E731
    fresh = check_out_folder(tmp_path / "new", "synth.json", overwrite=False, settings={}, identity=identity)
    assert fresh == (None, False)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "synth.json").write_text(json.dumps({"seed": 0}))
    (ours / "000000.png").write_bytes(b"x")
    (ours / "notes.txt").write_text("mine")
    assert check_out_folder(ours, "synth.json", overwrite=False, settings={"seed": 0}, identity=identity)[1] is False
    with pytest.raises(UserError, match="other settings"):
        check_out_folder(ours, "synth.json", overwrite=False, settings={"seed": 1}, identity=identity)
    assert check_out_folder(ours, "synth.json", overwrite=True, settings={"seed": 1}, identity=identity)[1] is True
    with pytest.raises(UserError, match="pass --overwrite"):         # a command that cannot resume
        check_out_folder(ours, "synth.json", overwrite=False)
    clear_outputs(ours, lambda rel: rel.endswith(".png"))
    assert sorted(p.name for p in ours.iterdir()) == ["notes.txt", "synth.json"]
    # A folder that is not a previous output of the command is never written into, not even with overwrite.
    with pytest.raises(UserError, match="not a previous merge output; refusing to delete"):
        check_out_folder(ours, "merge.json", overwrite=True)


def test_copy_rule_flags_exact_copies_when_the_real_set_has_duplicates():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(50, 8)).astype(np.float32)
    real[1] = real[0]                                          # a duplicate: some real-to-real distance is 0
    index = NearestReal(torch.from_numpy(real), percentile=1.0)
    assert index.threshold == 0.0
    memo = memorisation(real, np.concatenate([real[:5], rng.normal(size=(5, 8)).astype(np.float32)]))
    assert memo.flagged.tolist() == [True] * 5 + [False] * 5 and memo.threshold == 0.0
