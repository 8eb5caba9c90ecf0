"""`augment-gan synth`: write a labeled synthetic image set from a trained run."""
from __future__ import annotations

import json
from pathlib import Path

import click

from augment_gan.cli.verbosity import verbosity_options
from augment_gan.imagefile import SYNTH_FORMATS
from augment_gan.pseudolabel import CONFIDENCE
from augment_gan.tarshards import DEFAULT_IMAGES_PER_TAR


@click.command("synth")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--n", "n", type=int, default=None, help="Number of images, balanced over the classes.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--per-class", type=int, default=None, help="Images per class instead of --n (conditional runs).")
@click.option("--balance", is_flag=True,
              help="Per class, as many images as it lacks to match the largest training class (conditional runs).")
@click.option("--balance-to", type=int, default=None, help="--balance: fill every class up to this many images.")
@click.option("--classes", type=str, default=None, help="Comma-separated subset of the run's classes.")
@click.option("--seed", type=int, default=0, show_default=True, help="Image i depends only on (run, seed, i).")
@click.option("--truncation", type=float, default=1.0, show_default=True,
              help="ψ: scale latents toward the mean (<1: more typical, less diverse).")
@click.option("--format", "fmt", type=click.Choice(SYNTH_FORMATS), default="png", show_default=True,
              help="Image format, one file per image; or tar: PNGs in webdataset tar shards (large sets).")
@click.option("--images-per-tar", type=int, default=None,
              help=f"--format tar: images per shard, a multiple of 256 (default {DEFAULT_IMAGES_PER_TAR:,}).")
@click.option("--quality", type=int, default=None, help="JPEG/WebP quality 1-100 (default 95/90).")
@click.option("--keep-top", type=float, default=None,
              help="Discriminator rejection: generate n/F candidates, keep the best fraction F per class.")
@click.option("--dedup", is_flag=True, help="Drop near-copies of training images.")
@click.option("--dedup-real", type=click.Path(path_type=Path), default=None,
              help="Training images for --dedup (default: the folder recorded in the run).")
@click.option("--label-with", type=click.Path(path_type=Path), default=None,
              help="Unconditional runs: a few labeled images (class subfolders); a classifier trained on them labels "
                   "the candidates, and the first --n labeled confidently are written as OUT/<class>/<index>.png.")
@click.option("--label-confidence", type=float, default=CONFIDENCE, show_default=True,
              help="--label-with: keep a candidate when the classifier's softmax probability is at least this.")
@click.option("--shard", type=str, default=None, help="K/N: write only shard K of N (default: torchrun's RANK/WORLD_SIZE).")
@click.option("--batch-size", type=int, default=None, help="Generator batch (never changes the images).")
@click.option("--workers", type=int, default=None,
              help="Encoder threads (default: 1 per 8 cores on CPU, all cores but one with a GPU).")
@click.option("--threads", type=int, default=None,
              help="torch threads per generator lane (default: 1 on CPU, torch's with a GPU).")
@click.option("--lanes", type=int, default=None,
              help="Generator forwards run at once (default: one per core on CPU, 1 with a GPU).")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--overwrite", is_flag=True, help="Replace a set made with other settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@verbosity_options
def command(run: Path, n: int | None, out: Path, per_class: int | None, balance: bool, balance_to: int | None,
            classes: str | None, seed: int,
            truncation: float, fmt: str, quality: int | None, keep_top: float | None, dedup: bool,
            dedup_real: Path | None, images_per_tar: int | None, label_with: Path | None, label_confidence: float,
            shard: str | None, batch_size: int | None,
            workers: int | None, threads: int | None, lanes: int | None, device: str, overwrite: bool, as_json: bool,
            quiet: bool) -> None:
    """Write N synthetic images from RUN (a run directory = its latest checkpoint, or a checkpoint file).

    Conditional runs write OUT/<class>/<index>.png (balanced unless --per-class/--classes), unconditional
    runs OUT/<index>.png (with --label-with OUT/<class>/<index>.png, labeled by a classifier), plus a manifest
    (one JSON line per image) and OUT/synth.json; --format tar writes OUT/shard-<t>.tar instead (<index>.png,
    its manifest row <index>.json, label <index>.cls per image; read them with
    augment_gan.datasets.SyntheticTarDataset or webdataset). Image i is a pure function of (checkpoint, seed,
    i), so rerunning writes the same bytes, an interrupted run resumes, and shards add up to the single-process
    set.

    \b
    Examples:
      augment-gan synth runs/digits --n 10000 --out synthetic/digits
      augment-gan synth runs/digits --per-class 500 --classes 3,8 --out synthetic/38 --keep-top 0.5
      augment-gan synth runs/longtail --balance --out synthetic/rebalanced   # each class up to the largest
      augment-gan synth runs/digits --n 10000 --out synthetic/digits --shard 0/4   # ... up to 3/4
      augment-gan synth runs/digits --n 1000000 --out synthetic/big --format tar
      augment-gan synth runs/unlabeled --label-with ./labeled --n 1000 --out synthetic/labeled
      torchrun --nproc_per_node 4 -m augment_gan synth runs/digits --n 100000 --out synthetic/big
    """
    from augment_gan.manifest import MANIFEST
    from augment_gan.plan import parse_shard
    from augment_gan.synth import SynthConfig, synth

    config = SynthConfig(
        n=n, per_class=per_class, balance=balance, balance_to=balance_to, seed=seed, truncation=truncation, format=fmt, quality=quality,
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()) if classes is not None else None,
        keep_top=keep_top, dedup=dedup, dedup_real=str(dedup_real) if dedup_real else None,
        images_per_tar=images_per_tar, label_with=str(label_with) if label_with else None,
        label_confidence=label_confidence,
        batch_size=batch_size, shard=parse_shard(shard) if shard is not None else None, overwrite=overwrite,
        device=device, workers=workers, threads=threads, lanes=lanes,
        progress=not quiet)
    summary = synth(run, out, config)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    k, n_shards = summary.shard
    where = f" (shard {k}/{n_shards})" if n_shards > 1 else ""
    click.echo(f"{summary.images} images in {summary.out}{where}: {summary.written} written, "
               f"{summary.existing} already there, {summary.seconds:.1f} s"
               + (f", {summary.images_per_second:.0f} img/s" if summary.written else ""))
    if label_with is not None:
        click.echo(f"Filters: --label-with dropped {summary.dropped_confidence} candidates "
                   f"(confidence < {label_confidence:g})")
    if keep_top is not None or dedup:
        parts = []
        if keep_top is not None:
            parts.append(f"keep-top dropped {summary.dropped_keep_top}")
        if dedup:
            parts.append(f"dedup dropped {summary.dropped_dedup} (distance < {summary.dedup_threshold:.4f})")
        if summary.missing:
            parts.append(f"{summary.missing} indices left empty")
        click.echo("Filters: " + ", ".join(parts))
    if summary.manifest:
        click.echo(f"Manifest: {summary.manifest}")
    else:
        click.echo(f"Shard manifest: {summary.shard_manifest}; {Path(summary.out) / MANIFEST} is written "
                   "when every shard is done")
