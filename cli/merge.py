"""`augment-gan merge`: write real + synthetic images, augmented by a recipe, as one ImageFolder on disk."""
from __future__ import annotations

import json

import click

from augment_gan.cli.inspect import parse_background
from augment_gan.cli.verbosity import verbosity_options
from augment_gan.data import CHANNELS, FITS, RESOLUTIONS, ReadOptions


@click.command("merge")
@click.option("--real", "real", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Real image folder (class subfolders, as for ImageFolder).")
@click.option("--synthetic", type=click.Path(file_okay=False, path_type=str), default=None,
              help="Folder written by `augment-gan synth` (optional: without it, real images only).")
@click.option("--recipe", default="standard", show_default=True,
              help="Recipe name (see `augment-gan recipes list`) or path to a recipe YAML file.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output folder; must be empty or a previous merge output (with --overwrite).")
@click.option("--copies", type=click.IntRange(min=1), default=1, show_default=True,
              help="Augmented copies of each real image.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the augmentations and the synthetic draw.")
@click.option("--overwrite", is_flag=True, help="Replace a previous merge output in --out.")
@click.option("--resolution", type=click.Choice([str(r) for r in RESOLUTIONS]), default=None,
              help=f"Output side length [default: the synthetic images' size, else {ReadOptions.resolution}].")
@click.option("--fit", type=click.Choice(FITS), default="center-crop", show_default=True,
              help="How non-square real images become square.")
@click.option("--background", default="white", show_default=True, callback=parse_background,
              help="Colour behind transparent pixels and padding (name, #rrggbb or R,G,B).")
@click.option("--channels", type=click.Choice(CHANNELS), default="auto", show_default=True,
              help="auto = grayscale when every real image is grayscale, else RGB.")
@click.option("--balance", is_flag=True,
              help="Fill every class up to the largest one (COPIES × its image count): synthetic images of the "
                   "class first, more real copies only if those run out. Replaces the recipe's synthetic_ratio.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary (merge.json) as JSON.")
@verbosity_options
def command(real, synthetic, recipe, out, copies, seed, overwrite, resolution, fit, background, channels,
            balance, as_json, quiet) -> None:
    """Write a merged, augmented ImageFolder for training tools outside Python.

    Every real image is written COPIES times, each augmented by the recipe's real pipeline; synthetic
    images are added in the recipe's real:synthetic ratio, augmented by its synthetic pipeline. With
    --balance, rare classes are filled up to the largest one instead. All images get one size and
    channel count. OUT/merge.json records the settings, OUT/merge.jsonl where each image came from and
    its augmentation seed.

    \b
    Example:
      augment-gan merge --real examples/digits --synthetic synthetic/digits \\
          --recipe standard --copies 4 --out merged/digits
      augment-gan merge --real my-long-tail --synthetic synthetic/rare --balance --out merged/balanced
    """
    from augment_gan.merge import merge_folders

    summary = merge_folders(real, synthetic, out, recipe, copies=copies, seed=seed, overwrite=overwrite,
                            resolution=int(resolution) if resolution else None, fit=fit,
                            background=tuple(background), channels=channels, progress=not quiet,
                            balance=balance)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    counts = summary["counts"]
    if balance:
        repeats = counts["real"] - counts["real_images"] * copies
        click.echo(f"wrote {counts['total']:,} images to {out}, class-balanced: {counts['real']:,} real "
                   f"({repeats:,} of them extra copies), {counts['synthetic']:,} synthetic "
                   f"(recipe {summary['recipe']})")
    else:
        click.echo(f"wrote {counts['total']:,} images to {out}: {counts['real_images']:,} real × {copies} "
                   f"= {counts['real']:,} real, {counts['synthetic']:,} synthetic "
                   f"(recipe {summary['recipe']}, synthetic ratio {summary['synthetic_ratio']:g})")
    for name, per in sorted(counts["per_class"].items()):
        if name:
            click.echo(f"  {name:<16} {per['real']:>7,} real  {per['synthetic']:>7,} synthetic")
