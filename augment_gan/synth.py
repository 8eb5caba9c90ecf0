"""Writing a synthetic image set: `synth()` and its stages, from a checkpoint to files and a manifest.

The pieces it composes, each in its own module:
- the settings (`augment_gan.synthconfig`): `SynthConfig`, and the synth.json that records the set;
- the plan (`augment_gan.plan`): image i is a pure function of (checkpoint, seed, options, i); which latent
  index becomes which file, in units of up to 256 images of one class, and which shard owns a unit;
- the generator pipeline (`sample.decode_batches`): latents drawn ahead, G in parallel lanes;
- image files (`augment_gan.imagefile`): encoded and written atomically in a worker pool; or, with
  `--format tar`, PNGs appended to webdataset-style tar shards (`augment_gan.tarshards`);
- resume (`augment_gan.resume`): what of the plan is already on disk, and the merged manifest;
- the manifest (`augment_gan.manifest`) and the output folder rules (`augment_gan.outputs`).

Filters (off by default; every decision is a manifest row)
    `--dedup` drops candidates that copy a training image (`augment_gan.dedup`: 16×16 pixels, with
    evaluate's nearest-real-neighbour rule). `--keep-top F` ranks a unit's surviving candidates by D's logit
    and keeps the best k. Kept primaries keep their own index; kept extras take the unit's vacated indices in
    ascending order. So `--keep-top 1` equals no filter, an image that survives the filter sits in the same
    file as in an unfiltered run, and `--dedup` alone leaves gaps (counted as missing) that `--keep-top`
    refills from its oversampled pool. Ranking happens within a unit, not over the whole class: for
    n_c <= 256 that is exactly the per-class top F, beyond it each block of 256 keeps its own top F. That is
    what lets shards and resume work on units independently, with bounded memory.

Shards and resume
    Shard K of N owns the units at positions K, K+N, ...; `RANK`/`WORLD_SIZE` (torchrun) set the shard when
    `--shard` is not given. A rerun with the same settings skips done work, so an interrupted run or shard
    resumes where it stopped. Each shard writes its own manifest; whichever process finds every unit of
    the set done writes the merged one (rerunning any shard, or the whole set without `--shard`, merges too).

Safety
    Every file is written as `<name>.tmp-<pid>` in its final folder and renamed, so a killed run leaves at
    most temporary files, which the next run removes. A non-empty output folder is only reused when its
    `synth.json` records the same settings; other settings need `--overwrite`. Class names come from the
    checkpoint and are checked to be plain folder names. A process holds a lock on its shard of the folder
    (`guard.output_lock`): a second synth of the same shard, or of another --shard N, is refused.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from augment_gan.dedup import DedupIndex, dedup_root, load_dedup_index
from augment_gan.device import pick_device
from augment_gan.guard import output_lock
from augment_gan.imagefile import ImageWriter, default_workers
from augment_gan.manifest import (
    MANIFEST,
    ManifestRow,
    is_manifest_file,
    journal_name,
    shard_manifest_name,
    write_manifest,
)
from augment_gan.outputs import check_out_folder, class_folder, clear_outputs, write_json
from augment_gan.plan import IMAGE_NAME, IMAGE_TMP, Plan, Unit, balance_counts, make_plan, select, shard_from_env
from augment_gan.resume import SetRows, clean_stale_tmp, find_progress, try_merge
from augment_gan.synthconfig import SETTINGS, SynthConfig, make_settings, settings_identity
from augment_gan.tarshards import SHARD_NAME, SHARD_TMP, TarWriter

if TYPE_CHECKING:
    from augment_gan.checkpoint import Checkpoint


# ----------------------------------------------------------------------------------------------------
# Summary.

@dataclass
class SynthSummary:
    """What one `synth` call did, counted over the units of its shard."""

    out: str
    shard: tuple[int, int]
    planned: int
    """Final images this shard is responsible for."""
    written: int
    """Files written by this call."""
    existing: int
    """Files that were already there (resume) and were kept."""
    images: int
    """Files present at the end (written + existing)."""
    missing: int
    """Final indices left empty because `--dedup` dropped more than `--keep-top` could refill."""
    dropped_keep_top: int
    dropped_dedup: int
    dedup_threshold: float | None
    manifest: str | None
    """The merged manifest, or None while other shards are unfinished."""
    seconds: float
    images_per_second: float
    workers: int
    threads: int
    lanes: int
    batch_size: int
    device: str
    shard_manifest: str | None = None
    dropped_confidence: int = 0
    """`--label-with`: candidates whose label's confidence was under `--label-confidence`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# The stages of a run.

@dataclass
class _Run:
    """What the stages of one `synth` call share: the set, where it goes, and what has been done so far."""

    ckpt: Any
    config: SynthConfig
    out: Path
    shard: tuple[int, int]
    device: Any
    dedup: DedupIndex | None
    rows: SetRows
    valid: dict[int, bool] = field(default_factory=dict)
    """Final index -> its file exists and decodes (resume)."""
    done: list[ManifestRow] = field(default_factory=list)
    """This shard's manifest rows, found on disk or decided by this call."""
    written: int = 0
    existing: int = 0

    @property
    def filtered(self) -> bool:
        return self.config.keep_top is not None or self.config.dedup


def synth_owned(rel: str) -> bool:
    """A file name synth writes (what `--overwrite` may delete): images, tar shards, their temporaries,
    manifests."""
    folder, _, name = rel.rpartition("/")
    if not folder and (SHARD_NAME.match(name) or SHARD_TMP.match(name)):
        return True
    return bool(IMAGE_NAME.match(name) or IMAGE_TMP.match(name)) or (not folder and is_manifest_file(name))


def _prepare_folder(run: _Run, plan: Plan, settings: dict[str, Any], old: dict[str, Any] | None,
                    replace: bool) -> None:
    """Clear a replaced set, remove stale temporaries, record the settings, create the class folders (not for
    tar shards)."""
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    if replace:  # only reached with --overwrite
        clear_outputs(out, synth_owned, folders=(old or {}).get("selected_classes") or [])
        old = None
    clean_stale_tmp(out, plan, run.shard)
    if old is None or old != settings:
        write_json(out / SETTINGS, settings)
    if run.config.overwrite:
        for name in (MANIFEST, shard_manifest_name(run.shard), journal_name(run.shard)):
            (out / name).unlink(missing_ok=True)
    for name, count in zip(plan.classes, plan.counts):
        if name is not None and count and not plan.tar_units:  # no empty class folders: ImageFolder rejects them
            class_folder(out, name)


def _decide_unit(run: _Run, unit: Unit, buf: dict[str, dict[int, Any]], writer: ImageWriter | TarWriter,
                 on_done: Any) -> None:
    """Apply the filters to a unit whose candidates are all generated, and write the kept images."""
    import torch

    dropped = {c for c, d in buf["nn"].items() if d is not None and run.dedup.is_copy(d)}  # type: ignore[union-attr]
    assign, rejected = select(unit, buf["score"], dropped, run.config.keep_top)
    on_done([run.rows.row(unit, latent=c, index=None, d_score=buf["score"][c], nn_distance=buf["nn"][c],
                          reason=reason) for c, reason in rejected.items()])
    kept, paths, rows, skip_rows = [], [], [], []
    for c, index in sorted(assign.items(), key=lambda kv: kv[1]):
        row = run.rows.row(unit, latent=c, index=index, d_score=buf["score"][c], nn_distance=buf["nn"][c])
        if run.valid.get(index) and not run.config.overwrite:
            skip_rows.append(row)  # same settings, so the file already holds these bytes
        else:
            kept.append(buf["image"][c])
            paths.append(os.path.join(run.out, row.file))
            rows.append(row)
    run.existing += len(skip_rows)
    run.written += len(paths)
    on_done(skip_rows)
    writer.submit(torch.stack(kept) if kept else None, paths, rows)


def _filter_batch(run: _Run, batch: list[tuple[Unit, int]], images: Any, buffers: dict[int, dict[str, dict[int, Any]]],
                  writer: ImageWriter | TarWriter, on_done: Any) -> None:
    """Score a batch of candidates (uint8 N×C×H×W: the bytes that would be written); decide full units."""
    import torch

    from augment_gan import sample
    from augment_gan.pixels import to_float

    scores = nn = None
    if run.config.keep_top is not None:
        y = torch.tensor([u.label for u, _ in batch], device=run.device) if run.ckpt.num_classes else None
        with torch.inference_mode():
            scores = sample.aligned_forward(run.ckpt.D, to_float(images.to(run.device)), y).float().cpu().tolist()
    if run.dedup is not None:
        nn = run.dedup.distances(images).tolist()
    for k, (unit, latent) in enumerate(batch):
        buf = buffers.setdefault(unit.position, {"image": {}, "score": {}, "nn": {}})
        buf["image"][latent] = images[k]
        buf["score"][latent] = None if scores is None else round(scores[k], 6)
        buf["nn"][latent] = None if nn is None else round(nn[k], 6)
        if len(buf["image"]) == len(unit.candidates):
            del buffers[unit.position]
            _decide_unit(run, unit, buf, writer, on_done)


def _generate(run: _Run, jobs: list[tuple[Unit, list[int]]], batch_size: int, workers: int, lanes: int,
              threads: int) -> float:
    """Generate, filter and write every job; returns the seconds the loop took."""
    from tqdm import tqdm

    from augment_gan import sample
    from augment_gan.pixels import to_uint8

    config, shard, out = run.config, run.shard, str(run.out)
    todo = sum(len(cands) if not run.filtered else len(unit.finals) for unit, cands in jobs)
    bar = tqdm(total=todo, desc=f"synth {shard[0]}/{shard[1]}" if shard[1] > 1 else "synth", unit="img",
               file=sys.stderr, disable=not config.progress or todo == 0, dynamic_ncols=True)
    # The journal holds filter decisions as they are made, so a killed filtered run keeps them for resume.
    journal = open(run.out / journal_name(shard), "a") if run.filtered else None

    def on_done(rows: list[ManifestRow]) -> None:
        run.done.extend(rows)
        if journal is not None:
            journal.write("".join(r.to_line() for r in rows))
            journal.flush()
        bar.update(sum(r.kept for r in rows))

    if run.rows.plan.tar_units:
        tars = list(dict.fromkeys(run.rows.plan.tar_of(unit) for unit, _ in jobs))  # in the order images come
        writer: ImageWriter | TarWriter = TarWriter(run.out, tars, workers, on_done)
    else:
        writer = ImageWriter(workers, config.format, config.quality, on_done, config.pool)
    t_loop = time.perf_counter()
    ok = False
    buffers: dict[int, dict[str, dict[int, Any]]] = {}
    try:
        stream = [(unit, latent) for unit, cands in jobs for latent in cands]
        labels = [unit.label for unit, _ in stream] if run.ckpt.num_classes else None
        batches = sample.decode_batches(run.ckpt, config.seed, [latent for _, latent in stream], labels,
                                        truncation=config.truncation, batch_size=batch_size, lanes=lanes,
                                        threads=threads, device=run.device)
        with contextlib.closing(batches):
            for start, images in zip(range(0, len(stream), batch_size), batches):  # float N×C×H×W on the device
                batch = stream[start:start + batch_size]
                if run.filtered:
                    _filter_batch(run, batch, to_uint8(images).cpu(), buffers, writer, on_done)
                    continue
                # On a CPU the uint8 conversion happens on the encoder threads, off G's critical path.
                images = images if run.device.type == "cpu" else to_uint8(images).cpu()
                rows = [run.rows.row(unit, latent=latent, index=latent) for unit, latent in batch]
                run.written += len(rows)
                writer.submit(images, [os.path.join(out, r.file) for r in rows], rows)
        writer.drain()
        ok = True
    finally:
        writer.close(ok)
        bar.close()
        if journal is not None:
            journal.close()
    return time.perf_counter() - t_loop


def synth(checkpoint: str | os.PathLike[str] | Checkpoint, out: str | Path, config: SynthConfig | None = None,
          **options: Any) -> SynthSummary:
    """Write (this shard of) a synthetic set to `out`; returns what was done (`augment-gan synth`).

    `checkpoint` is a run directory, a checkpoint file, or an already loaded `Checkpoint`. Give the
    settings as a `SynthConfig` or as its fields: `synth("runs/digits", "synthetic/digits", n=1000)`.
    """
    if config is None:
        config = SynthConfig(**options)
    elif options:
        raise TypeError("give either a SynthConfig or its fields as keywords, not both")
    t_start = time.perf_counter()
    shard = config.shard or shard_from_env()
    device = pick_device(config.device)

    # Load the checkpoint and plan the set.
    if hasattr(checkpoint, "G_ema"):
        ckpt = checkpoint
    else:
        from augment_gan.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint, device=device)
    ckpt.G_ema.to(device)
    if config.keep_top is not None:
        ckpt.D.to(device)
    if config.label_with is not None:  # an unconditional run's candidates, labelled by a classifier
        from augment_gan.labelwith import label_with

        return label_with(ckpt, Path(out), config, shard, device, t_start)
    counts = (balance_counts(ckpt.meta.data.class_counts, list(ckpt.classes), config.classes, config.balance_to)
              if config.balance else None)
    plan = make_plan(ckpt.classes, ckpt.num_classes, n=config.n, per_class=config.per_class, counts=counts,
                     classes=config.classes, keep_top=config.keep_top, fmt=config.format,
                     images_per_tar=config.images_per_tar)
    out = Path(out)
    # Two processes writing one shard would remove each other's temporaries: one of them is refused.
    with output_lock(out, "synth", shard, exclusive=config.overwrite):
        return _synth_locked(ckpt, plan, out, config, shard, device, t_start)


def _synth_locked(ckpt: Any, plan: Plan, out: Path, config: SynthConfig, shard: tuple[int, int], device: Any,
                  t_start: float) -> SynthSummary:
    """The rest of `synth`, holding the output folder's lock."""
    from augment_gan.sample import default_batch_size, default_lanes

    # May we write there? Then the training images for --dedup, and the folder.
    real_root = dedup_root(ckpt, config.dedup_real) if config.dedup else None
    settings = make_settings(ckpt, plan, config, real_root)
    old, replace = check_out_folder(out, SETTINGS, overwrite=config.overwrite, settings=settings, identity=settings_identity)
    dedup = load_dedup_index(ckpt, real_root, config.progress) if real_root is not None else None
    if dedup is not None:
        settings["filters"]["dedup_threshold"] = dedup.threshold
    rows = SetRows(plan, config.seed, config.truncation, ckpt.digest)
    run = _Run(ckpt, config, out, shard, device, dedup, rows)
    _prepare_folder(run, plan, settings, old, replace)

    # Resume: what this shard finds done, and what it still has to generate.
    batch_size = config.batch_size or default_batch_size(ckpt.resolution)
    workers = config.workers or default_workers(device.type)
    lanes, threads = default_lanes(device.type, config.lanes, config.threads)
    owned = plan.owned(shard)
    progress = find_progress(out, rows, owned, filtered=run.filtered, overwrite=config.overwrite,
                             resolution=ckpt.resolution, workers=workers)
    run.valid, run.done, run.existing = progress.valid, progress.rows, progress.existing

    # Generate, filter, write.
    loop_seconds = _generate(run, progress.jobs, batch_size, workers, lanes, threads)

    # Manifests: this shard's, then the merged one if every shard is done.
    shard_manifest = out / shard_manifest_name(shard)
    write_manifest(shard_manifest, run.done)
    (out / journal_name(shard)).unlink(missing_ok=True)
    merged = shard_manifest if shard[1] == 1 else try_merge(out, rows, run.filtered)

    kept = sum(r.kept for r in run.done)
    planned = sum(len(u.finals) for u in owned)
    return SynthSummary(
        out=str(out), shard=shard, planned=planned, written=run.written, existing=run.existing,
        images=kept, missing=planned - kept,
        dropped_keep_top=sum(r.filter == "keep-top" for r in run.done),
        dropped_dedup=sum(r.filter == "dedup" for r in run.done),
        dedup_threshold=dedup.threshold if dedup is not None else None,
        manifest=str(merged) if merged else None, seconds=round(time.perf_counter() - t_start, 3),
        images_per_second=round(run.written / loop_seconds, 2) if loop_seconds > 0 and run.written else 0.0,
        workers=workers, threads=threads, lanes=lanes, batch_size=batch_size, device=str(device),
        shard_manifest=str(shard_manifest) if shard[1] > 1 else None)
