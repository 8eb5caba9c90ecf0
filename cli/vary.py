"""`augment-gan vary`: variations of real images through the run's latent encoder."""
from __future__ import annotations

import json
from pathlib import Path

import click

from augment_gan.cli.verbosity import verbosity_options


@click.command("vary")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--n", "n", type=int, default=None, help="Variations per source image (default 4).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--sigma", type=float, default=None,
              help="Latent noise, in units of the prior's std (0 = reconstruction; default 0.5, 0.25 with --interpolate).")
@click.option("--interpolate", is_flag=True,
              help="Decode random points between each image and a same-class latent neighbour (DeepSMOTE-style).")
@click.option("--neighbours", type=int, default=5, show_default=True,
              help="--interpolate: partners come from this many nearest same-class images.")
@click.option("--balance", is_flag=True,
              help="Instead of --n per image: per class, as many images as it lacks to match the largest class.")
@click.option("--balance-to", type=int, default=None, help="--balance: fill every class up to this many images.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds the latent noise: variation k of an image depends only on (run, seed, image, k).")
@click.option("--class", "class_name", type=str, default=None,
              help="Class of an unlabeled source (needed by conditional runs).")
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Images encoded and decoded at once (never changes the images).")
@click.option("--workers", type=int, default=None, help="Encoder threads (default: 1 per 8 cores on CPU, all cores but one with a GPU).")
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--overwrite", is_flag=True, help="Replace variations made with other settings.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@verbosity_options
def command(run: Path, source: Path, n: int | None, out: Path, sigma: float | None, interpolate: bool,
            neighbours: int, balance: bool, balance_to: int | None, seed: int, class_name: str | None,
            batch_size: int, workers: int | None, device: str, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Write N variations of each image in SOURCE (an image file or a folder) using RUN's encoder.

    Each image is encoded to mu by the latent encoder E; variation k decodes mu + sigma·eps_k with the EMA
    generator. A labeled folder keeps its classes: OUT/<class>/<stem>_<k>.png, plus a manifest.
    --interpolate decodes mu_a + lam·(mu_b − mu_a) (+ noise) for a same-class latent neighbour b instead;
    --balance writes, per class, what it lacks to match the largest class (a long-tailed folder made even).

    \b
    Examples:
      augment-gan vary runs/digits examples/digits --n 4 --out varied/digits
      augment-gan vary runs/digits photo.png --n 16 --sigma 0.3 --class 7 --out varied/seven
      augment-gan vary runs/longtail data/longtail --interpolate --balance --out varied/rebalanced
    """
    from augment_gan.vary import VaryConfig, vary

    config = VaryConfig(n=n, sigma=sigma, interpolate=interpolate, neighbours=neighbours, balance=balance,
                        balance_to=balance_to, seed=seed, class_name=class_name, overwrite=overwrite, device=device,
                        batch_size=batch_size, workers=workers, progress=not quiet)
    summary = vary(run, source, out, config)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    click.echo(f"{summary.images} images from {summary.sources} sources in {summary.out}: {summary.written} "
               f"written, {summary.existing} already there, {summary.seconds:.1f} s")
    click.echo(f"Manifest: {summary.manifest}")
