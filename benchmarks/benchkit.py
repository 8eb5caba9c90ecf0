"""What the benchmark scripts share: comma-separated options, mean ± std over seeds, copying a drawn subset of
a folder, and writing results.json and table.md. Scripts import it with benchmarks/ on sys.path (run as
`python benchmarks/<script>.py`, Python puts the script's folder there; tests load the scripts the same way)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from augment_gan.atomic import write_bytes_atomic
from augment_gan.errors import UserError


def numbers(text: str, what: str, kind: Callable = int, minimum: float = 0, unique: bool = False) -> list:
    """The values of a comma-separated option (`--what`), each >= `minimum`, in the order given (with `unique`,
    repeats dropped: for seeds or ratios that name runs; not for per-class counts, which may repeat)."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} must be comma-separated {'integers' if kind is int else 'numbers'}, "
                        f"got {text!r}") from None
    if not values or min(values) < minimum:
        raise UserError(f"--{what} must list numbers >= {minimum:g}, got {text!r}")
    return list(dict.fromkeys(values)) if unique else values


def choices(text: str, what: str, allowed: tuple[str, ...]) -> list[str]:
    """The names of a comma-separated option, each one of `allowed` (e.g. what="arm"), once each in the order
    given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise UserError(f"unknown {what}(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def stats(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "runs": a.tolist()}


def write_subset(root: Path, files: list[str], out: Path) -> None:
    """Copy `files` (relative paths under `root`, class subfolders kept) into `out`, a folder `fit` can read."""
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / rel, out / rel)


def save_results(out: Path, results: dict) -> None:
    """out/results.json, rewritten atomically (after every seed or folder: an interrupted run keeps the rest)."""
    write_bytes_atomic(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())


def finish(out: Path, table: str) -> None:
    """Write out/table.md and print the table to stdout."""
    write_bytes_atomic(out / "table.md", (table + "\n").encode())
    print(table)
