"""`augment-gan inspect FOLDER`: what the reader makes of a folder, before any training."""
from __future__ import annotations

import json
from pathlib import Path

import click

from augment_gan.cli.verbosity import verbosity_options
from augment_gan.data import CHANNELS, FITS, RESOLUTIONS, ReadOptions, inspect_folder


def parse_background(ctx, param, value: str) -> tuple[int, int, int]:
    """Click callback: "white", "#000000" or "255,255,255" -> an RGB tuple."""
    from PIL import ImageColor

    text = value.strip()
    try:
        if "," in text:
            rgb = tuple(int(v) for v in text.split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
            return rgb
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise click.BadParameter(f"expected a colour name, #rrggbb or R,G,B (0..255), got {value!r}") from None


def read_option_flags(function):
    """The `ReadOptions` flags, shared by every command that reads an image folder."""
    flags = [
        click.option("--resolution", type=click.Choice([str(r) for r in RESOLUTIONS]),
                     default=str(ReadOptions.resolution),
                     show_default=True, help="Side length the images are decoded to."),
        click.option("--fit", type=click.Choice(FITS), default="center-crop", show_default=True,
                     help="How non-square images become square."),
        click.option("--background", default="white", show_default=True, callback=parse_background,
                     help="Colour behind transparent pixels and padding (name, #rrggbb or R,G,B)."),
        click.option("--channels", type=click.Choice(CHANNELS), default="auto", show_default=True,
                     help="auto = grayscale when every image is grayscale, else RGB."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=ReadOptions.max_pixels,
                     show_default=True, help="Skip images whose header claims more pixels (decompression bombs)."),
    ]
    for flag in reversed(flags):
        function = flag(function)
    return function


def read_options_from(resolution: str, fit: str, background, channels: str, max_pixels: int) -> ReadOptions:
    return ReadOptions(resolution=int(resolution), fit=fit, background=tuple(background),
                       channels=channels, max_pixels=max_pixels)


def _histogram_line(histogram: dict[str, int], limit: int = 8) -> str:
    items = [f"{key} ×{count:,}" for key, count in list(histogram.items())[:limit]]
    if len(histogram) > limit:
        items.append(f"… {len(histogram) - limit} more")
    return ", ".join(items)


def _report(summary: dict) -> str:
    n, skipped = summary["images"], summary["skipped"]
    lines = [f"folder     {summary['folder']}"]
    extra = f", {summary['ignored']:,} non-image files ignored" if summary["ignored"] else ""
    lines.append(f"images     {n:,} decodable, {len(skipped):,} skipped{extra}")
    if summary["labeled"]:
        lines.append(f"labels     {len(summary['classes'])} classes (one subfolder per class)")
        width = max(len(name) for name in summary["classes"])
        for name, count in summary["classes"].items():
            note = "  (no decodable image)" if count == 0 else ""
            lines.append(f"  {name:<{width}}  {count:>6,}{note}")
    elif summary["layout"] == "mixed":
        lines.append("labels     none: images both at the top level and in subfolders (move them into "
                     "class subfolders for labels)")
    else:
        lines.append("labels     none: images are not in class subfolders")
    if summary["options"]["channels"] != "auto":
        decision = f"forced by --channels {summary['options']['channels']}"
    elif summary["channels"] == 1:
        decision = "grayscale: every image is grayscale"
    else:
        decision = f"RGB: {summary['colour_images']:,} of {n:,} images have colour"
    lines.append(f"channels   {summary['channels']} ({decision})")
    lines.append(f"sizes      {_histogram_line(summary['sizes'])}")
    lines.append(f"modes      {_histogram_line(summary['modes'])}")
    lines.append(f"formats    {_histogram_line(summary['formats'])}")
    if skipped:
        lines.append("skipped:")
        lines.extend(f"  {entry['file']}: {entry['reason']}" for entry in skipped)
    return "\n".join(lines)


@click.command("inspect")
@click.argument("folder", type=click.Path(path_type=Path))
@read_option_flags
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Dataset cache folder [default: $AUGMENT_GAN_CACHE or ~/.cache/augment-gan].")
@click.option("--no-cache", is_flag=True, help="Decode without reading or writing the cache.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Decoding processes [default: CPU count, at most 8].")
@verbosity_options
def command(folder: Path, resolution, fit, background, channels, max_pixels, as_json: bool,
            cache_dir: Path | None, no_cache: bool, workers: int | None, quiet: bool) -> None:
    """Report what the reader makes of FOLDER: image count, classes, channels, sizes, skipped files.

    Every file is decoded (that is the only proof it is readable); the result is cached, so a later
    `fit` with the same options does not decode again.

    \b
    Examples:
      augment-gan inspect examples/digits
      augment-gan inspect photos/ --fit pad --background black --json
    """
    options = read_options_from(resolution, fit, background, channels, max_pixels)
    summary = inspect_folder(folder, options, cache_dir=cache_dir, use_cache=not no_cache,
                             workers=workers, progress=not quiet)
    if as_json:
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        click.echo(_report(summary))
