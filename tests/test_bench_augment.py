"""The augment benchmark script: its draws, the spread rule and targets, the stage clock, the tables, and one
short run end to end on small real digit and emoji folders. Gains are only checked to be consistent (a
decision needs minutes of fitting; the benchmark itself is for measuring)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from augment_gan.augment import STAGES

from benchscripts import load_benchmark
from fakesynth import copy_classes


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_augment")


# ------------------------------------------------------------------------------------------------------
# Pure pieces.

LABELS = np.repeat(np.arange(3), 10)


def test_fewshot_and_longtail_draw_disjoint_balanced_test_sets(bench):
    args = bench.parse_args(["--shots", "2", "--test-per-class", "3", "--counts", "6,3,1"])
    data, test = bench.draw("fewshot", LABELS, 0, args)
    assert np.bincount(LABELS[data]).tolist() == [2, 2, 2] and np.bincount(LABELS[test]).tolist() == [3, 3, 3]
    assert not set(data) & set(test)
    assert np.array_equal(data, bench.draw("fewshot", LABELS, 0, args)[0])
    assert not np.array_equal(data, bench.draw("fewshot", LABELS, 1, args)[0])
    data, test = bench.draw("longtail", LABELS, 0, args)
    assert np.bincount(LABELS[data]).tolist() == [6, 3, 1] and np.bincount(LABELS[test]).tolist() == [3, 3, 3]
    assert not set(data) & set(test)
    with pytest.raises(bench.UserError, match="--counts lists 3 numbers but the digit folder has 4 classes"):
        bench.draw("longtail", np.repeat(np.arange(4), 10), 0, args)
    with pytest.raises(bench.UserError, match="class 0 has 10 images"):   # the default 100 test images per digit
        bench.draw("fewshot", LABELS, 0, bench.parse_args([]))


def test_emoji_draw_holds_out_a_share_of_every_category(bench):
    labels = np.array([0] * 20 + [1] * 8 + [2] * 4)
    data, test = bench.draw("emoji", labels, 0, bench.parse_args([]))
    assert np.bincount(labels[test]).tolist() == [5, 2, 1]                  # 25% of each, rounded
    assert sorted(np.concatenate([data, test]).tolist()) == list(range(len(labels)))
    assert not np.array_equal(test, bench.draw("emoji", labels, 1, bench.parse_args([]))[1])


def test_within_spread_is_two_standard_errors_of_the_difference(bench):
    # SE of the difference: √(0.01² + 0.01²) = 1.41 pp, so the band is ±2.83 pp around the prediction.
    assert bench.within_spread(0.03, 0.01, 0.05, 0.01)
    assert not bench.within_spread(0.02, 0.01, 0.05, 0.01)
    assert bench.within_spread(0.075, 0.01, 0.05, 0.01) and not bench.within_spread(0.08, 0.01, 0.05, 0.01)
    assert bench.within_spread(0.0, 0.0, 0.0, 0.0)                           # no choice: nothing changes
    assert bench.within_spread(0.01, None, 0.01, None) and not bench.within_spread(0.01, None, 0.02, None)


def test_targets_need_no_harm_the_spread_and_three_points_on_the_long_tail(bench):
    v = bench.verdict("longtail", 0.03, 0.01, 0.02, 0.01)
    assert v["never_harm"] and v["within_spread"] and not v["target_met"] and v["least_gain"] == 0.03
    assert bench.verdict("longtail", 0.05, 0.01, 0.04, 0.01)["target_met"]
    assert bench.verdict("fewshot", 0.03, 0.01, 0.02, 0.01)["target_met"]
    harm = bench.verdict("emoji", 0.0, 0.01, -0.001, 0.01)
    assert not harm["never_harm"] and harm["within_spread"] and not harm["target_met"]
    assert not bench.verdict("fewshot", 0.10, 0.01, 0.01, 0.01)["target_met"]  # helps, far less than promised
    assert bench.verdict("emoji", 0.0, 0.0, 0.0, 0.0)["target_met"]            # "no": real only, no harm
    cancelled = float(np.mean([0.0 - 0.05, 0.05 - 0.0 + 0.2 - 0.1, 0.1 - 0.2]))   # -4.6e-18: rounding, not harm
    assert cancelled < 0 and bench.verdict("emoji", 0.0, 0.01, cancelled, 0.02)["never_harm"]
    assert not bench.verdict("longtail", 0.0, 0.0, 0.0, 0.0)["target_met"]


def test_stage_seconds_run_from_one_start_to_the_next(bench):
    starts = [("split", 100.0), ("fit", 100.5), ("candidates", 400.5)]
    assert bench.stage_seconds(starts, 412.0) == {"split": 0.5, "fit": 300.0, "candidates": 11.5}
    assert bench.stage_seconds([], 5.0) == {}


def test_stage_clock_notes_augments_stage_lines_and_restores_the_logger(bench, capsys):
    logger = logging.getLogger("augment_gan.augment")
    level = logger.level
    with bench.stage_clock() as clock:
        logger.info("[1/6] split")
        logger.info("split 100 images of 10 classes")
        logger.info("[2/6] fit")
    logger.info("[3/6] candidates")
    assert [name for name, _ in clock.starts] == ["split", "fit"]
    assert clock.starts[0][1] <= clock.starts[1][1]
    assert logger.level == level and clock not in logger.handlers
    assert "augment: split 100 images of 10 classes" in capsys.readouterr().err


def test_best_rejected_is_the_largest_validation_gain(bench):
    decision = {"candidates": [{"name": "a", "gain": -0.01}, {"name": "b", "gain": 0.02}, {"name": "c", "gain": 0.02}]}
    assert bench.best_rejected(decision)["name"] == "b"
    assert bench.best_rejected({"candidates": []}) is None


def _record(folder: str, chosen: bool) -> dict:
    """A results.json run: a choice measured on the test set, or a "no" with its best rejected candidate."""
    tested = {"name": "synth-balance@0.5", "set": "synth-balance", "ratio": 0.5, "images": 2480,
              "predicted": {"gain": 0.04, "se": 0.01, "runs": [0.03, 0.04, 0.05]},
              "test": {"gain": 0.035, "se": 0.005, "std": 0.0087, "runs": [0.03, 0.03, 0.045], "real_only": 0.8,
                       "mixed": 0.835, "measurable": True},
              "within_spread": True}
    predicted = {"gain": 0.04, "se": 0.01} if chosen else {"gain": 0.0, "se": 0.0}
    realised = ({k: tested["test"][k] for k in ("gain", "se", "std", "runs")} if chosen
                else {"gain": 0.0, "se": 0.0, "std": 0.0, "runs": [0.0] * 3})
    return {"folder": folder, "seed": 0,
            "data": {"images": 900, "classes": [str(c) for c in range(10)], "imbalance": 100.0},
            "test": {"images": 2000, "real_only": 0.7, "baseline_score": 0.8},
            "augment": {"metric": "balanced_accuracy", "baseline": "real-balanced", "classifier": {"model": "SmallCNN", "recipe": "standard",
                                                                       "steps": 300, "batch_size": 64}},
            "predicted": predicted, "realised": realised, "chosen": tested if chosen else None,
            "rejected": None if chosen else tested,
            "verdict": {"within_spread": True, "least_gain": 0.03, "target_met": chosen},
            "seconds": {"split": 0.2, "fit": 300.4, "candidates": 20.0, "measure": 190.0, "decide": 0.1,
                        "outputs": 3.0, "augment": 514.0, "test": 62.0}}


def test_the_tables_show_a_choice_a_no_and_the_stage_times(bench):
    results = {"runs": [_record("longtail", True), _record("emoji", False)], "kimg": None, "minutes": 5.0,
               "device": "cpu", "augment_config": {"val_fraction": 0.2, "seeds": 3}, "package_version": "0.1.0",
               "torch": "2.x", "platform": "Linux", "started": "2026-12-01T10:00:00", "command": "python bench"}
    table = bench.markdown_table(results)
    assert ("| longtail | 0 | 900 | 10 | 100.0 | balanced accuracy (ACSA) | synth-balance@0.5 (2480 images) | "
            "+4.0 ± 1.0 | real-only with class-balanced sampling 80.0% | +3.5 ± 0.9 | +3.0 / +3.0 / +4.5 | yes | met (≥ +3 pp) |") in table
    assert ("| emoji | 0 | 900 | 10 | 100.0 | balanced accuracy (ACSA) | no measurable gain | — | "
            "real-only with class-balanced sampling 80.0% | "
            "0 (real only) | — | yes | **missed** (≥ +3 pp) |") in table
    assert ("| emoji | 0 | synth-balance@0.5 (2480 images) | +4.0 ± 1.0 | +3.5 ± 0.9 | +3.0 / +3.0 / +4.5 | yes | "
            "**yes** (the no was wrong) |") in table
    assert "| longtail | 0 | 0 | 300 | 20 | 190 | 3 | 514 | 62 |" in table   # decide + outputs: 3.1 s
    assert bench.SPREAD_RULE in table and "5 wall-minutes" in table and table.endswith("`python bench`")
    results["runs"] = [_record("longtail", True)]
    assert "Where augment said no" not in bench.markdown_table(results)


# ------------------------------------------------------------------------------------------------------
# End to end.

COUNTS = [8, 6, 5, 4, 3, 3, 2, 2, 2, 2]


def test_short_run_writes_results_and_tables(bench, tmp_path: Path, shared_data: Path, capsys):
    # Imported here: pytest imports fixtures_run first, as a plugin of other test files.
    from fixtures_run import TINY_NETS

    digits = copy_classes(shared_data / "mnist", tmp_path / "digits", 0, 12)
    emoji = copy_classes(shared_data / "emoji-twitter", tmp_path / "emoji", 0, 8,
                         classes=("activities", "flags", "symbols"))
    fit_config = tmp_path / "tiny.yaml"
    fit_config.write_text(yaml.safe_dump(dict(TINY_NETS, batch_size=16)))
    out = tmp_path / "out"
    argv = ["--folders", "fewshot,longtail,emoji", "--mnist", str(digits), "--emoji", str(emoji), "--shots", "3",
            "--counts", ",".join(map(str, COUNTS)), "--test-per-class", "2", "--kimg", "0.032", "--steps", "4",
            "--set-size", "1", "--fit-config", str(fit_config), "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert [(r["folder"], r["seed"]) for r in results["runs"]] == [("fewshot", 0), ("longtail", 0), ("emoji", 0)]
    assert results["augment_config"]["seeds"] == 3 and results["augment_config"]["steps"] == 4
    assert results["kimg"] == 0.032 and results["command"].endswith(" ".join(argv))

    expected = {"fewshot": ([3] * 10, [2] * 10, "accuracy", 1), "longtail": (COUNTS, [2] * 10, "balanced_accuracy", 1),
                "emoji": ([6, 6, 6], [2, 2, 2], "accuracy", 3)}
    for r in results["runs"]:
        data_counts, test_counts, metric, channels = expected[r["folder"]]
        assert r["data"]["per_class"] == data_counts and r["test"]["per_class"] == test_counts
        data_dir = Path(r["data"]["folder"])
        assert [len(list((data_dir / c).iterdir())) for c in r["data"]["classes"]] == data_counts
        assert r["augment"]["metric"] == metric and r["augment"]["channels"] == channels
        assert r["augment"]["seeds"] == [0, 1, 2] and 0 <= r["test"]["real_only"] <= 1
        # The baseline is augment's: class-balanced sampling on the long tail, plain real-only elsewhere.
        assert r["augment"]["baseline"] == ("real-balanced" if r["folder"] == "longtail" else "real")
        assert 0 <= r["test"]["baseline_score"] <= 1
        decision = json.loads((Path(r["augment"]["dir"]) / "decision.json").read_text())
        assert r["augment"]["chosen"] == decision["chosen"]
        # Every stage of augment timed from its log lines, and the test measurement.
        assert list(r["seconds"])[:6] == list(STAGES[:6]) and all(v >= 0 for v in r["seconds"].values())
        assert r["seconds"]["test"] > 0 and r["seconds"]["fit"] <= r["seconds"]["augment"]
        realised, tested = r["realised"], r["chosen"] or r["rejected"]
        assert tested["name"] in [c["name"] for c in decision["candidates"]]
        assert len(tested["test"]["runs"]) == 3
        assert tested["test"]["gain"] == pytest.approx(np.mean(tested["test"]["runs"]))
        if r["chosen"]:    # the user's gain is the chosen set's on the test set
            assert realised["runs"] == tested["test"]["runs"] and r["rejected"] is None
            chosen = next(c for c in decision["candidates"] if c["name"] == r["augment"]["chosen"])
            assert r["predicted"] == {"gain": chosen["gain"], "se": chosen["se"]}
        else:              # real images only: nothing changes; the best rejected candidate is measured anyway
            assert realised == {"gain": 0.0, "se": 0.0, "std": 0.0, "runs": [0.0] * 3}
            assert tested["predicted"]["gain"] == max(c["gain"] for c in decision["candidates"])
        assert r["verdict"]["within_spread"] == bench.within_spread(
            realised["gain"], realised["se"], r["predicted"]["gain"], r["predicted"]["se"])

    table = printed.out
    assert "| folder | seed | DATA images | classes | imbalance | metric | decision |" in table
    assert "| fewshot | 0 | 30 | 10 | 1.0 | accuracy |" in table and "| longtail | 0 | 37 | 10 | 4.0 |" in table
    assert "Wall time (s) of each stage" in table and "| emoji | 0 |" in table
    assert (out / "table.md").read_text().strip() == table.strip()
    assert "augment: [2/6] fit" in printed.err


def test_bad_arguments_are_one_line_errors(bench, tmp_path: Path, shared_data: Path, capsys):
    assert bench.main(["--folders", "fewshot,bogus", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: unknown folder(s) bogus") and len(err.splitlines()) == 1
    digits = copy_classes(shared_data / "mnist", tmp_path / "digits", 0, 3, classes=("0", "1"))
    assert bench.main(["--folders", "longtail", "--mnist", str(digits), "--counts", "1,1,1",
                       "--out", str(tmp_path / "o")]) == 1
    assert "Error: --counts lists 3 numbers but the digit folder has 2 classes" in capsys.readouterr().err
    assert bench.main(["--folders", "fewshot", "--mnist", str(digits), "--out", str(tmp_path / "o")]) == 1
    assert "Error: class 0 has 3 images; 10 to train and 100 to test need more" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert bench.main(["--out", str(tmp_path / "full")]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
