"""Does a synthetic set measurably help? The paired-seed decision rule of `augment`, and its report section.

Functions of the classifier scores (no torch): the metric, the paired gain with its standard error, the
choice, and the section `augment` adds to the run's report (the decision table and per-class sample grids).

The rule. For each seed s the real-only classifier and the real+candidate classifier train with the same
seed (initialisation, batches, augmentations), so the difference d_s of their held-out scores cancels most
of the seed-to-seed spread. gain = mean(d_s), SE = std(d_s, ddof=1) / sqrt(S). A candidate counts only when
gain > 0 and gain > SE (a gain of more than one standard error: roughly a one-sided 84% bar with a normal
approximation, chosen because S is small, 3 by default, and a stricter bar would almost never pass on a
small folder; the per-seed numbers are in decision.json for anyone who wants another rule). The chosen
candidate is the one with the largest gain among those; with none, the answer is "no measurable gain". One
seed gives no SE, so it never yields a choice.

The baseline. On balanced classes it is the real-only classifier (`REAL`). On imbalanced ones (`IMBALANCE`) it
is the real-only classifier trained with class-balanced sampling (`REAL_BALANCED`: every class's images
repeated up to the largest class's count), the best honest real-only setting: on the long-tailed digits it is
+7.8 pp balanced accuracy above plain real-only training (benchmarks/RESULTS.md), so a synthetic set measured
against plain training would take credit for balancing that needs no GAN. The plain real-only arm is still
measured and every candidate's gain over it is kept (`vs_real`).
"""
from __future__ import annotations

import html
import io
import math
from typing import Any, Iterable, Sequence

import numpy as np

IMBALANCE = 3.0
"""Classes count as imbalanced when the largest has at least this many times the images of the smallest."""
METRICS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy (ACSA)"}
"""Metric key -> how it is named in text."""
REAL = "real"
"""The name of the real-only arm in the per-seed results."""
REAL_BALANCED = "real-balanced"
"""The real-only arm with class-balanced sampling: the baseline when the classes are imbalanced."""
BASELINES = {REAL: "real-only", REAL_BALANCED: "real-only with class-balanced sampling"}
"""Baseline arm -> how it is named in text."""


def imbalance(counts: Sequence[int]) -> float:
    """Largest class count / smallest (inf when a class is empty)."""
    return max(counts) / min(counts) if min(counts) > 0 else math.inf


def baseline_for(counts: Sequence[int]) -> str:
    """The arm every candidate must beat: `REAL_BALANCED` when the classes are imbalanced, else `REAL`."""
    return REAL_BALANCED if imbalance(counts) >= IMBALANCE else REAL


def metric_for(counts: Sequence[int]) -> str:
    """`balanced_accuracy` (mean per-class recall, ACSA) when the classes are imbalanced, else `accuracy`: on a
    long tail plain accuracy barely sees the rare classes that synthetic images are meant to help."""
    return "balanced_accuracy" if imbalance(counts) >= IMBALANCE else "accuracy"


def scores(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, balanced accuracy (mean recall over the classes present in `labels`) and each class's recall
    (None for a class with no held-out image)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    recall: list[float | None] = []
    for c in range(num_classes):
        mask = labels == c
        recall.append(float((predicted[mask] == c).mean()) if mask.any() else None)
    present = [r for r in recall if r is not None]
    return {"accuracy": float((predicted == labels).mean()),
            "balanced_accuracy": float(np.mean(present)) if present else 0.0,
            "recall": recall}


def paired_gain(real: Sequence[float], mixed: Sequence[float]) -> tuple[float, float | None]:
    """(mean of mixed − real per seed, its standard error; None for a single seed)."""
    d = np.asarray(mixed, dtype=np.float64) - np.asarray(real, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
    return float(d.mean()), se


def decide(results: Iterable[dict[str, Any]], candidates: Sequence[dict[str, Any]], metric: str,
           seeds: Sequence[int], baseline: str = REAL) -> dict[str, Any]:
    """The decision over `candidates` ({"name", "set", "ratio", "images"} each) from per-seed `results` (rows
    {"candidate", "seed", <metric>, ...}; the real-only arm is `REAL`), each compared with the `baseline` arm
    (`REAL` or `REAL_BALANCED`). Only the given `seeds` count, each of which must have a row for `REAL`, the
    baseline and every candidate."""
    by_key = {(r["candidate"], r["seed"]): r for r in results}
    arms = list(dict.fromkeys([REAL, baseline, *(c["name"] for c in candidates)]))
    missing = [f"{name} seed {s}" for name in arms for s in seeds if (name, s) not in by_key]
    if missing:
        raise ValueError(f"results missing for {', '.join(missing[:5])}")
    real = [by_key[REAL, s][metric] for s in seeds]
    base = [by_key[baseline, s][metric] for s in seeds]
    rows = []
    for c in candidates:
        mixed = [by_key[c["name"], s][metric] for s in seeds]
        gain, se = paired_gain(base, mixed)
        runs = [{"seed": s, "real": a, "mixed": b, "gain": b - a, "scores": _scores(by_key[c["name"], s])}
                for s, a, b in zip(seeds, base, mixed)]
        row = {**c, "runs": runs, "mean": float(np.mean(mixed)), "gain": gain, "se": se,
               "measurable": se is not None and gain > 0 and gain > se}
        if baseline != REAL:
            vs_real, vs_real_se = paired_gain(real, mixed)
            row["vs_real"] = {"gain": vs_real, "se": vs_real_se}
        rows.append(row)
    passing = [r for r in rows if r["measurable"]]
    chosen = max(passing, key=lambda r: r["gain"]) if passing else None   # max keeps the first of equals
    name, over = METRICS[metric], BASELINES[baseline]
    if chosen is not None:
        reason = (f"{chosen['name']} has the largest mean paired gain in {name} over {over}, {_pp(chosen['gain'])} "
                  f"± {_pp(chosen['se'], sign=False)} (SE over {len(seeds)} seeds), among the "
                  f"{len(passing)} of {len(rows)} candidates whose gain is positive and larger than its SE")
    elif not rows:
        reason = "there was no candidate to measure"
    elif len(seeds) < 2:
        reason = ("one seed gives no standard error, so no gain can be told from noise; "
                  "run with --seeds 3 or more")
    else:
        best = max(rows, key=lambda r: r["gain"])
        reason = (f"no candidate's mean paired gain in {name} over {over} is positive and larger than its "
                  f"standard error (best: {best['name']}, {_pp(best['gain'])} ± {_pp(best['se'], sign=False)} over "
                  f"{len(seeds)} seeds)")

    def arm(key: str) -> dict[str, Any]:
        return {"runs": [{"seed": s, **_scores(by_key[key, s])} for s in seeds],
                "mean": float(np.mean([by_key[key, s][metric] for s in seeds]))}

    return {"metric": metric, "seeds": list(seeds), "baseline": baseline, "real_only": arm(REAL),
            **({"real_balanced": arm(REAL_BALANCED)} if baseline == REAL_BALANCED else {}),
            "candidates": rows, "chosen": chosen["name"] if chosen else None, "reason": reason}


def _scores(row: dict[str, Any]) -> dict[str, Any]:
    """Every score of a result row: accuracy, balanced accuracy and the per-class recall."""
    return {k: row[k] for k in (*METRICS, "recall") if k in row}


def _pp(value: float | None, sign: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.2f} pp" if sign else f"{100 * value:.2f} pp"


def decision_html(decision: dict[str, Any]) -> str:
    """The decision as an HTML section: the verdict, then one table row per candidate with its per-seed gains."""
    name = METRICS[decision["metric"]]
    chosen = decision["chosen"]
    verdict = (f"Chosen: <b>{html.escape(chosen)}</b>." if chosen else "<b>No measurable gain</b>: nothing is "
               "recommended.")
    head = ("<tr><th>candidate</th><th>images</th><th>" + html.escape(name) + "</th>"
            + "".join(f"<th>gain, seed {s}</th>" for s in decision["seeds"])
            + "<th>mean gain ± SE</th><th></th></tr>")
    body, baseline = [], decision.get("baseline", REAL)  # decisions written before REAL_BALANCED have none
    for key, arm, label in (("real_only", REAL, "real only"),
                            ("real_balanced", REAL_BALANCED, "real only, class-balanced sampling")):
        if key in decision:
            mark = "baseline" if arm == baseline else ""
            body.append(f"<tr><td>{label}</td><td class=num></td><td class=num>{100 * decision[key]['mean']:.1f}%</td>"
                        + "<td></td>" * (len(decision["seeds"]) + 1) + f"<td>{mark}</td></tr>")
    for c in decision["candidates"]:
        mark = "chosen" if c["name"] == chosen else ("gain > SE" if c["measurable"] else "")
        body.append(f"<tr><td>{html.escape(c['name'])}</td><td class=num>{c['images']}</td>"
                    f"<td class=num>{100 * c['mean']:.1f}%</td>"
                    + "".join(f"<td class=num>{_pp(r['gain'])}</td>" for r in c["runs"])
                    + f"<td class=num>{_pp(c['gain'])} ± {_pp(c['se'], sign=False)}</td>"
                    f"<td>{'<b>' + mark + '</b>' if mark == 'chosen' else mark}</td></tr>")
    reason = decision["reason"]
    return (f"<p>{verdict} {html.escape(reason[:1].upper() + reason[1:])}.</p>"
            f"<table>{head}{''.join(body)}</table>")


def class_grid(images: np.ndarray, labels: np.ndarray, num_classes: int, per_class: int = 8) -> bytes:
    """PNG of up to `per_class` of the uint8 N×H×W×C `images` of each class, one row per class (blank tiles
    where a class has fewer)."""
    from PIL import Image

    from augment_gan.grid import tile

    tiles = np.full((num_classes * per_class, *images.shape[1:]), 255, dtype=np.uint8)
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)[:per_class]
        tiles[c * per_class:c * per_class + len(idx)] = images[idx]
    array = tile(tiles, per_class)
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def decision_section(decision: dict[str, Any], classes: list[str], grids: list[tuple[str, bytes]]) -> str:
    """The report section of a decision.json: how it was measured, the table, and the (title, PNG) `grids`."""
    from augment_gan.report import _img, _upscaled_width

    c, split = decision["classifier"], decision["split"]
    parts = ["<h2>Does the synthetic data help?</h2>",
             f"<p class=muted>Small CNN, recipe {html.escape(c['recipe'])}, {c['steps']} steps per classifier, "
             f"seeds {', '.join(map(str, decision['seeds']))} (paired), {html.escape(METRICS[decision['metric']])} "
             f"on the held-out {split['val_fraction']:.0%} of each class (largest / smallest class: "
             f"{decision['imbalance']:.1f}).</p>",
             decision_html(decision)]
    if split["kept_in_training"]:
        parts.append("<p class=muted>Too small to hold out (kept in training, not measured): "
                     f"{html.escape(', '.join(split['kept_in_training']))}.</p>")
    parts.append("<h3>Per class</h3><p class=muted>One row per class: " + html.escape(", ".join(classes))
                 + ".</p><div class=grids>")
    for title, png in grids:
        parts.append(f"<figure>{_img(png, alt=title, width=_upscaled_width(png, 560))}"
                     f"<figcaption>{html.escape(title)}</figcaption></figure>")
    parts.append("</div>")
    return "\n".join(parts)
