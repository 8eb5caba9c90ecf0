"""`synth RUN --label-with LABELED --n N`: a labeled synthetic set from an unconditional run.

Candidate j is the image plain `synth` writes as image j of the run (latent `sample.latents(seed, [j])`, ψ, G_ema).
A classifier trained on the labeled folder (`augment_gan.pseudolabel`, seeded by `--seed`) gives each candidate
a class and that class's softmax probability, its confidence. Candidates are taken in order j = 0, 1, 2, ...;
one whose confidence is at least `--label-confidence` is kept, until N are: the k-th kept candidate becomes
OUT/<class>/<k:06d>.<ext>. Every decision is a manifest row with the class and its confidence (a rejected
candidate: `kept: false`, filter "label-confidence", no file); synth.json names the feature space the labels
come from ("features": "classifier"). Conditional runs label their images already: plain `synth`.

Determinism: candidates are labelled in fixed blocks of `BLOCK` (candidates 256·b .. 256·b + 255 in one forward),
so neither `--batch-size` nor a resume point changes a float sum, and the classifier trains in one torch thread;
the same command writes the same bytes (on the CPU). Resume: rows are journaled as they are decided (synth's
`manifest.jsonl.partial`); a rerun keeps the longest stretch of decided candidates 0..L-1 whose kept files
decode, trains the classifier again only when work is left, and continues at candidate L. Writing, locking and
the rules for reusing a folder are synth's (`imagefile`, `guard.output_lock`, `outputs.check_out_folder`).
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from augment_gan.errors import UserError
from augment_gan.guard import output_lock
from augment_gan.imagefile import ImageWriter, default_workers, readable_image
from augment_gan.manifest import MANIFEST, ManifestRow, journal_name, write_manifest
from augment_gan.outputs import check_out_folder, class_folder, clear_outputs, write_json
from augment_gan.pseudolabel import LabelerConfig, check_channels, read_labeled, train_labeler
from augment_gan.resume import load_rows
from augment_gan.synth import SynthSummary, synth_owned  # the files --overwrite may delete, as synth
from augment_gan.synthconfig import SETTINGS, SynthConfig, sampling_settings, settings_head

BLOCK = 256
"""Candidates labelled in one classifier forward, always the same ones (see the module docstring)."""
MAX_TRIES = 20
"""Candidates tried per requested image before giving up: when fewer than 1 in 20 is labelled confidently, G
mostly makes images the classifier does not recognise (train the run longer, or lower --label-confidence)."""
REJECTED = "label-confidence"
"""The manifest's `filter` of a candidate under the confidence threshold."""
_IDENTITY = ("layout_version", "classes", "n", "seed", "truncation", "latent_scheme", "format", "quality",
             "label_with")


def _identity(settings: dict[str, Any]) -> dict[str, Any]:
    return {**{k: settings.get(k) for k in _IDENTITY}, "checkpoint": (settings.get("checkpoint") or {}).get("digest")}


def _settings(ckpt: Any, config: SynthConfig, labeled: Any, labeler: LabelerConfig) -> dict[str, Any]:
    return {
        **settings_head(ckpt),
        "classes": list(labeled.classes),
        "conditional": False,
        "n": config.n,
        **sampling_settings(config, config.format),
        "resolution": ckpt.resolution,
        "channels": ckpt.channels,
        "label_with": {"labeled": str(labeled.root), "images": len(labeled), "confidence": config.label_confidence,
                       "features": "classifier",
                       "classifier": {"network": "SmallCNN (augment_gan.classifier), softmax", "recipe": labeler.recipe,
                                      "steps": labeler.steps, "batch_size": labeler.batch_size, "seed": config.seed},
                       "block": BLOCK, "max_tries": MAX_TRIES},
    }


class _Set:
    """The rows of one --label-with set: how they are made, and which rows found on disk belong to it."""

    def __init__(self, ckpt: Any, config: SynthConfig, classes: list[str]):
        self.config, self.classes, self.digest = config, classes, ckpt.digest

    def row(self, latent: int, index: int | None, label: int, confidence: float) -> ManifestRow:
        """Candidate `latent`, kept as final image `index` or (None) rejected."""
        name = self.classes[label]
        return ManifestRow(file=None if index is None else f"{name}/{index:06d}.{self.config.format}", index=index,
                           seed=self.config.seed, class_name=name, label=label, checkpoint=self.digest,
                           truncation=self.config.truncation, kept=index is not None,
                           filter=None if index is not None else REJECTED, latent=latent, confidence=confidence)

    def rebuild(self, row: ManifestRow) -> ManifestRow | None:
        """A row read from disk, made again from its decision when it is one of this set's, else None."""
        c = self.config
        if (row.seed, row.truncation, row.checkpoint) != (c.seed, c.truncation, self.digest):
            return None
        if not (isinstance(row.latent, int) and row.latent >= 0 and row.class_name in self.classes
                and isinstance(row.confidence, (int, float)) and not isinstance(row.confidence, bool)):
            return None
        label = self.classes.index(row.class_name)
        kept = row.confidence >= c.label_confidence
        if row.label != label or row.kept is not kept or (kept and not isinstance(row.index, int)):
            return None
        rebuilt = self.row(row.latent, row.index if kept else None, label, float(row.confidence))
        return rebuilt if rebuilt == row else None


def _done(out: Path, rows: _Set, n: int, resolution: int) -> tuple[list[ManifestRow], int]:
    """(the rows of candidates 0..L-1, L): the longest stretch of decided candidates whose kept images are the
    finals 0, 1, ... in order and decode (at most n kept)."""
    found = load_rows(out, rows)  # type: ignore[arg-type]  (a _Set rebuilds rows like synth's SetRows)
    done: list[ManifestRow] = []
    kept = 0
    while kept < n and len(done) in found:
        row = found[len(done)]
        if row.kept and (row.index != kept or not readable_image(out / str(row.file), resolution)):
            break
        done.append(row)
        kept += row.kept
    return done, len(done)


def label_with(ckpt: Any, out: Path, config: SynthConfig, shard: tuple[int, int], device: Any,
               t_start: float) -> SynthSummary:
    """`synth(run, out, n=N, label_with=LABELED)` for an unconditional run (see the module docstring)."""
    from augment_gan.data import ReadOptions

    if ckpt.num_classes:
        raise UserError(f"{ckpt.path} is a class-conditional run: plain synth already labels its images "
                        f"({', '.join(ckpt.classes)}); --label-with is for unconditional runs")
    if shard[1] > 1:
        raise UserError("--label-with writes its set in one process (no --shard, no torchrun)")
    options = ReadOptions(resolution=ckpt.resolution, fit=ckpt.config.fit, background=tuple(ckpt.config.background))
    # No cache: reading the user's folder must not write anywhere but the output folder (as vary).
    assert config.label_with is not None and config.n is not None  # SynthConfig allows no other count
    labeled = read_labeled(config.label_with, options, what="--label-with", use_cache=False, progress=False)
    check_channels(labeled, ckpt.channels, what="--label-with", against=f"the run {ckpt.path}")
    classes = list(labeled.classes)
    # The held-out measurement would cost a second training and is recorded by fit --labels only.
    labeler_config = LabelerConfig(confidence=config.label_confidence, held_out=0.0)
    settings = _settings(ckpt, config, labeled, labeler_config)
    with output_lock(out, "synth", shard, exclusive=config.overwrite):
        old, replace = check_out_folder(out, SETTINGS, overwrite=config.overwrite, settings=settings,
                                        identity=_identity)
        if replace:  # only reached with --overwrite
            folders = sorted({*((old or {}).get("classes") or []), *((old or {}).get("selected_classes") or [])})
            clear_outputs(out, synth_owned, folders=folders)
        if old != settings:
            write_json(out / SETTINGS, settings)
        for folder in [out, *(out / c for c in classes)]:
            for tmp in folder.glob("*.tmp-*") if folder.is_dir() else []:
                tmp.unlink(missing_ok=True)  # left by a killed run (we hold the folder's lock)
        if config.overwrite:
            for name in (MANIFEST, journal_name(shard)):
                (out / name).unlink(missing_ok=True)
        rows = _Set(ckpt, config, classes)
        done, start = _done(out, rows, config.n, ckpt.resolution)
        existing = sum(r.kept for r in done)
        written, seconds = 0, 0.0
        if existing < config.n:
            labeler = train_labeler(labeled, labeler_config, seed=config.seed, device=str(device),
                                    progress=config.progress)
            written, seconds = _generate(ckpt, config, rows, labeler, out, done, start, shard, device)
        write_manifest(out / MANIFEST, done)
        (out / journal_name(shard)).unlink(missing_ok=True)
    from augment_gan.sample import default_batch_size, default_lanes

    lanes, threads = default_lanes(device.type, config.lanes, config.threads)
    return SynthSummary(
        out=str(out), shard=shard, planned=config.n, written=written, existing=existing,
        images=sum(r.kept for r in done), missing=0, dropped_keep_top=0, dropped_dedup=0, dedup_threshold=None,
        manifest=str(out / MANIFEST), seconds=round(time.perf_counter() - t_start, 3),
        images_per_second=round(written / seconds, 2) if seconds > 0 and written else 0.0,
        workers=config.workers or default_workers(device.type), threads=threads, lanes=lanes,
        batch_size=config.batch_size or default_batch_size(ckpt.resolution), device=str(device),
        dropped_confidence=sum(not r.kept for r in done))


def _generate(ckpt: Any, config: SynthConfig, rows: _Set, labeler: Any, out: Path, done: list[ManifestRow],
              start: int, shard: tuple[int, int], device: Any) -> tuple[int, float]:
    """Label candidates from `start` on, write the kept ones, append every decision to `done` (and the journal)
    until `config.n` are kept -> (images written, seconds)."""
    import torch
    from tqdm import tqdm

    from augment_gan import sample
    from augment_gan.pixels import nchw_to_hwc, to_uint8

    n = config.n
    assert n is not None
    kept = sum(r.kept for r in done)
    end = -(-n * MAX_TRIES // BLOCK) * BLOCK
    first = start // BLOCK * BLOCK  # the whole block of `start` is generated again: it is labelled as one
    batch_size = config.batch_size or sample.default_batch_size(ckpt.resolution)
    lanes, threads = sample.default_lanes(device.type, config.lanes, config.threads)
    bar = tqdm(total=n - kept, desc="synth --label-with", unit="img", file=sys.stderr, disable=not config.progress,
               dynamic_ncols=True)
    journal = open(out / journal_name(shard), "a")
    made: set[int] = set()

    def on_done(new: list[ManifestRow]) -> None:
        done.extend(new)
        journal.write("".join(r.to_line() for r in new))
        journal.flush()
        bar.update(sum(r.kept for r in new))

    writer = ImageWriter(config.workers or default_workers(device.type), config.format, config.quality, on_done,
                         config.pool)
    written, ok, t_loop = 0, False, time.perf_counter()
    try:
        batches = sample.decode_batches(ckpt, config.seed, range(first, end), None, truncation=config.truncation,
                                        batch_size=batch_size, lanes=lanes, threads=threads, device=device)
        with contextlib.closing(batches):
            buffer: list[torch.Tensor] = []
            block_start = first
            for images in batches:  # float N×C×H×W on the device
                buffer.append(to_uint8(images).cpu())  # the bytes that are written, and labelled
                while kept < n and sum(len(b) for b in buffer) >= BLOCK:
                    pending = torch.cat(buffer)
                    block, buffer = pending[:BLOCK], [pending[BLOCK:]]
                    labels, confidence = labeler.label(nchw_to_hwc(block))
                    keep, paths, kept_rows, rejected = [], [], [], []
                    for k in range(max(0, start - block_start), BLOCK):
                        label, p = int(labels[k]), float(confidence[k])
                        if p < config.label_confidence:
                            rejected.append(rows.row(block_start + k, None, label, p))
                            continue
                        row = rows.row(block_start + k, kept, label, p)
                        if label not in made:  # no empty class folders: ImageFolder rejects them
                            class_folder(out, rows.classes[label])
                            made.add(label)
                        keep.append(block[k])
                        paths.append(str(out / str(row.file)))
                        kept_rows.append(row)
                        kept += 1
                        if kept == n:
                            break
                    on_done(rejected)
                    writer.submit(torch.stack(keep) if keep else None, paths, kept_rows)
                    written += len(paths)
                    block_start += BLOCK
                if kept == n:
                    break
        writer.drain()
        ok = True
    finally:
        writer.close(ok)
        bar.close()
        journal.close()
    if kept < n:
        raise UserError(f"only {kept} of {end} candidates reached confidence {config.label_confidence:g} (asked for "
                        f"{n}); train the run longer or lower --label-confidence")
    return written, time.perf_counter() - t_loop
