"""The training report: one self-contained HTML page (images embedded as base64 PNG) with a run's sample
grids, loss and adaptive-augmentation curves from `log.jsonl`, and optionally the `evaluate` metrics and
nearest-neighbour pairs of a synthetic set.

Reads only what `fit` writes into a run directory (`log.jsonl`, `grids/grid-<step>.png`, `config.json`,
`checkpoints/ckpt-<step>.json`); plots need matplotlib.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from augment_gan.atomic import write_bytes_atomic
from augment_gan.errors import UserError
from augment_gan.outputs import check_room, removed_on_failure
from augment_gan.runmeta import latest_meta

LOSS_KEYS = ("loss_d", "loss_g")
SELFSUP_KEYS = ("loss_rot_d", "loss_rot_g", "loss_completion", "loss_encoder")
_GRID = re.compile(r"^grid-(\d+)\.png$")
_MAX_PROGRESS_GRIDS = 4  # earliest, latest and evenly spaced ones between: shows how training went


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window (works on headless servers)
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("report needs matplotlib, a dependency of augment-gan: pip install matplotlib") from None
    return plt


# ----------------------------------------------------------------------------------------------------
# Reading a run directory.


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, number of unreadable lines) of a JSONL training log. A line being written by a running
    `fit` may be cut short, so bad lines are counted and skipped rather than fatal."""
    records, bad = [], 0
    if not path.is_file():
        return records, bad
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        else:
            bad += 1
    return records, bad


def list_grids(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's sample grids, oldest first."""
    folder = run_dir / "grids"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _GRID.match(p.name))]
    return sorted(found)


def check_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` as a Path, or a `UserError` when it is not a folder written by `fit`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    if not any((run_dir / name).exists() for name in ("log.jsonl", "grids", "checkpoints")):
        raise UserError(f"{run_dir} is not a training run (no log.jsonl, grids/ or checkpoints/)")
    return run_dir


# ----------------------------------------------------------------------------------------------------
# Figures.


def _png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def curves_png(records: list[dict[str, Any]], ada_target: float | None = None) -> bytes:
    """Losses (adversarial and self-supervised) and the adaptive-augmentation p and r_t, against kimg;
    `ada_target` draws r_t's target (p rises while r_t is above it: D is overfitting)."""
    plt = _matplotlib()
    x_key = "kimg" if all("kimg" in r for r in records) else "step"
    x = [r[x_key] for r in records]
    selfsup = [k for k in SELFSUP_KEYS if any(k in r for r in records)]
    panels = 2 + bool(selfsup)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.4), squeeze=False)
    axes = axes[0]

    def plot(ax, keys, title):
        for key in keys:
            pts = [(xi, r[key]) for xi, r in zip(x, records) if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=key, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)

    plot(axes[0], LOSS_KEYS, "adversarial losses")
    plot(axes[1], ("p", "rt"), "adaptive augmentation")
    if ada_target is not None:
        axes[1].axhline(ada_target, color="gray", linestyle=":", linewidth=1, label="r_t target")
        axes[1].legend(fontsize=8)
    if selfsup:
        plot(axes[2], selfsup, "self-supervised losses")
    fig.tight_layout()
    data = _figure_png(fig)
    plt.close(fig)
    return data


# ----------------------------------------------------------------------------------------------------
# HTML.

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.25em .8em;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
img.px{image-rendering:pixelated}.muted{color:#777;font-size:.9em}
.grids{display:flex;flex-wrap:wrap;gap:1em}.grids figure{margin:0}
figcaption{font-size:.85em;color:#555}
"""


def _img(data: bytes, *, alt: str, width: int | None = None, pixelated: bool = True) -> str:
    style = f' width="{width}"' if width else ""
    cls = ' class="px"' if pixelated else ""
    return f'<img{cls}{style} alt="{html.escape(alt)}" src="data:image/png;base64,{_png_b64(data)}">'


def _upscaled_width(png: bytes, limit: int = 1000) -> int:
    """Display width for a grid of small tiles: an integer multiple of its own width (crisp pixels)."""
    from PIL import Image

    width = Image.open(io.BytesIO(png)).size[0]
    return width * max(1, limit // width)


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)


def _metrics_html(result: dict[str, Any], pairs_png: bytes | None) -> str:
    r = result
    m = r["memorisation"]
    rows = [
        ("Fréchet distance", f"{r['fd']:.3f}", "lower is closer"
         + ("" if r.get("fd_real_halves") is None else f"; real vs real halves {r['fd_real_halves']:.3f}")),
        ("KID", f"{r['kid']['mean']:.4f}", f"± {r['kid']['std']:.4f}, subsets of {r['kid']['subset_size']}"),
        ("precision", f"{r['precision']:.3f}", f"synthetic inside the real manifold (k={r['k']})"),
        ("recall", f"{r['recall']:.3f}", "real inside the synthetic manifold"),
        ("density", f"{r['density']:.3f}", "≈1 when the sets match"),
        ("coverage", f"{r['coverage']:.3f}", "real neighbourhoods holding a synthetic image"),
        ("memorised", f"{100 * m['share']:.1f}%",
         f"{m['flagged']} images closer to a real one than {100 - m['percentile']:.0f}% of real pairs"),
    ]
    body = "".join(f"<tr><th>{html.escape(a)}</th><td class=num>{html.escape(b)}</td><td class=muted>"
                   f"{html.escape(c)}</td></tr>" for a, b, c in rows)
    out = [f"<p>Real: <code>{html.escape(r['real']['path'])}</code> ({r['real']['images']} images); synthetic: "
           f"<code>{html.escape(r['synthetic']['path'])}</code> ({r['synthetic']['images']} images), at "
           f"{r['resolution']}px.<br>Features: <b>{html.escape(r['features']['name'])}</b>"
           f" ({r['features']['dim']}-d)"
           + ("" if r["features"].get("normalised") is None else
              " — not comparable with published FID numbers") + ".</p>",
           f"<table>{body}</table>"]
    d = r.get("downstream")
    if d:
        def pct(s):
            return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}%"
        out.append(
            f"<h3>Downstream accuracy</h3><p class=muted>Small CNN, {d['steps']} steps, recipe {html.escape(d['recipe'])},"
            f" synthetic ratio {d['synthetic_ratio']:g}, {d['seeds']} seeds, {d['n_train']} train / {d['n_test']}"
            f" test images. Test: {html.escape(d['test'])}.</p><table>"
            + _rows([("real only", pct(d["real_only"])), ("real + synthetic", pct(d["real_plus_synthetic"])),
                     ("gain", f"{100 * d['gain']['mean']:+.1f} pp ± {100 * d['gain']['std']:.1f}")]) + "</table>")
    p = r.get("probe")
    if p:
        out.append("<h3>Discriminator linear probe</h3><table>"
                   + _rows([("trained D", f"{100 * p['trained_d']:.1f}%"),
                            ("random-init D", f"{100 * p['random_d']:.1f}%")]) + "</table>")
    if pairs_png:
        out.append("<h3>Nearest neighbours</h3><p class=muted>Top row: the synthetic images closest to a real "
                   "image; bottom row: that real image. Identical pairs mean memorised training images.</p>"
                   + _img(pairs_png, alt="closest synthetic/real pairs", width=_upscaled_width(pairs_png)))
    return "\n".join(out)


def build_report(run_dir: str | Path, *, evaluation: dict[str, Any] | None = None,
                 pairs_png: bytes | None = None) -> str:
    """The report page for `run_dir` as an HTML string (every image embedded)."""
    run_dir = check_run_dir(run_dir)
    _matplotlib()  # fail before any work when the extra is missing
    records, bad_lines = read_log(run_dir / "log.jsonl")
    grids = list_grids(run_dir)

    meta = latest_meta(run_dir)
    config = meta.config.to_dict() if meta is not None else None
    if config is None and (run_dir / "config.json").is_file():
        try:
            config = json.loads((run_dir / "config.json").read_text()).get("config")
        except (json.JSONDecodeError, AttributeError):
            config = None
    classes = list(meta.classes) if meta is not None else []
    conditional = meta is not None and meta.conditional and bool(classes)

    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>augment-gan report: "
             f"{html.escape(run_dir.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>augment-gan report: {html.escape(run_dir.name)}</h1>",
             f"<p class=muted>{html.escape(str(run_dir.resolve()))} — generated "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>"]

    # Summary.
    summary = []
    last = records[-1] if records else {}
    if last:
        summary += [("steps", str(last.get("step"))), ("kimg", f"{last.get('kimg', 0):g}"),
                    ("training time", f"{last.get('time_s', 0) / 60:.1f} min"),
                    ("adaptive p (last)", f"{last.get('p', 0):.3f}")]
    if config:
        summary += [("resolution", f"{config.get('resolution')}px"), ("batch size", str(config.get("batch_size"))),
                    ("loss", str(config.get("loss")))]
    if meta is not None:
        summary += [("channels", str(meta.channels)),
                    ("classes", ", ".join(classes) if conditional else "unconditional")]
    if summary:
        parts.append("<h2>Run</h2><table>" + _rows(summary) + "</table>")

    # Samples.
    parts.append("<h2>Samples</h2>")
    if grids:
        step, latest = grids[-1]
        caption = f"EMA generator at step {step}"
        if conditional:
            caption += "; one row per class: " + ", ".join(classes[:16])
        parts.append(f"<figure>{_img(latest.read_bytes(), alt=f'samples at step {step}', width=512)}"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        if len(grids) > 1:
            n = min(_MAX_PROGRESS_GRIDS, len(grids))
            picks = sorted({round(i * (len(grids) - 1) / (n - 1)) for i in range(n)})
            parts.append("<h3>Progress</h3><div class=grids>" + "".join(
                f"<figure>{_img(grids[i][1].read_bytes(), alt=f'step {grids[i][0]}', width=240)}"
                f"<figcaption>step {grids[i][0]}</figcaption></figure>" for i in picks) + "</div>")
    else:
        parts.append("<p class=muted>No sample grids in grids/ yet.</p>")

    # Curves.
    parts.append("<h2>Training curves</h2>")
    if records:
        target = (config or {}).get("ada_target")
        parts.append(_img(curves_png(records, target if isinstance(target, (int, float)) else None), alt="loss and augmentation curves", pixelated=False))
        if bad_lines:
            parts.append(f"<p class=muted>{bad_lines} unreadable log line(s) skipped.</p>")
    else:
        parts.append("<p class=muted>No log.jsonl records yet.</p>")

    # Metrics.
    if evaluation is not None:
        parts.append("<h2>Synthetic data</h2>" + _metrics_html(evaluation, pairs_png))

    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run_dir: str | Path, out: str | Path | None = None, *, real: str | Path | None = None,
                 synthetic: str | Path | None = None, metrics_file: str | Path | None = None,
                 eval_config=None, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the report for `run_dir` to `out` (default `RUN_DIR/report.html`) atomically; returns its path.

    With `real` and `synthetic`, runs `augment_gan.evaluate.compute` and includes its metrics and
    nearest-neighbour pairs; with `metrics_file` (a `metrics.json` from `evaluate --out`), includes
    those instead, with the `pairs.png` beside it.
    """

    run_dir = check_run_dir(run_dir)
    out = Path(out) if out is not None else run_dir / "report.html"
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if (real is None) != (synthetic is None):
        raise UserError("pass both --real and --synthetic to include metrics")
    if metrics_file is not None and real is not None:
        raise UserError("pass either --metrics or --real/--synthetic, not both")
    _matplotlib()
    with removed_on_failure(out.parent):  # a failed report leaves no new folder behind
        check_room(out.parent)  # a read-only --out fails now, not after the page is built
        return _write_report(run_dir, out, real, synthetic, metrics_file, eval_config, progress)


def _write_report(run_dir: Path, out: Path, real: str | Path | None, synthetic: str | Path | None,
                  metrics_file: str | Path | None, eval_config: Any, progress: bool) -> Path:
    evaluation, pairs = None, None
    if metrics_file is not None:
        path = Path(metrics_file)
        try:
            evaluation = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read metrics file {path}: {exc}") from None
        if not isinstance(evaluation, dict) or "fd" not in evaluation:
            raise UserError(f"{path} is not a metrics.json written by `augment-gan evaluate --out`")
        pairs_path = path.parent / "pairs.png"
        pairs = pairs_path.read_bytes() if pairs_path.is_file() else None
    elif real is not None:
        from augment_gan.evaluate import EvaluateConfig, compute

        result = compute(real, synthetic, eval_config or EvaluateConfig(), progress=progress)
        evaluation, pairs = result.result, result.pairs_png

    page = build_report(run_dir, evaluation=evaluation, pairs_png=pairs)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, page.encode("utf-8"))
    return out
