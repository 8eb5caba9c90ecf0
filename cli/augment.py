"""`augment-gan augment DATA --out DIR`: fit, make candidate synthetic sets, keep the one measured to help."""
from __future__ import annotations

import json
from pathlib import Path

import click

from augment_gan.augment import AugmentConfig
from augment_gan.cli.verbosity import verbosity_options
from augment_gan.data import MODEL_RESOLUTIONS

_DEFAULTS = AugmentConfig()  # the options' defaults are the config's (importing it does not import torch)


def _ratios(ctx: click.Context, param: click.Parameter, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"give comma-separated shares such as 0.25,0.5, got {value!r}") from None


@click.command("augment")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: synthetic/, recipe.yaml, decision.json, report.html (and work/, the stages).")
@click.option("--minutes", type=float, default=_DEFAULTS.minutes, show_default=True,
              help="Wall-clock minutes of the fit, in total (a resumed run counts what it used before).")
@click.option("--kimg", type=float, default=None,
              help="Fit budget in thousands of real images shown (instead of --minutes).")
@click.option("--unlabeled", type=click.Path(path_type=Path), default=None,
              help="A folder of unlabeled images to fit on, with DATA's training part as its labels.")
@click.option("--val-fraction", type=float, default=_DEFAULTS.val_fraction, show_default=True,
              help="Share of each class held out to measure on, in (0, 0.5] (a class of one image stays in training).")
@click.option("--seeds", type=int, default=_DEFAULTS.seeds, show_default=True,
              help="Paired classifier seeds: each trains real-only and real+candidate (3 or more for a decision).")
@click.option("--steps", type=int, default=_DEFAULTS.steps, show_default=True,
              help="Optimizer steps of every classifier (the same for every arm).")
@click.option("--ratios", default=",".join(f"{r:g}" for r in _DEFAULTS.ratios), show_default=True, callback=_ratios,
              help="Shares of synthetic images per batch at which each candidate set is measured.")
@click.option("--set-size", type=int, default=_DEFAULTS.set_size, show_default=True,
              help="Fewest images in a balanced candidate set (more when the largest ratio needs more).")
@click.option("--recipe", default=_DEFAULTS.recipe, show_default=True,
              help="Augmentation recipe of the classifiers, and the base of recipe.yaml (name or YAML path).")
@click.option("--resolution", type=click.Choice([str(r) for r in MODEL_RESOLUTIONS]), default=str(_DEFAULTS.resolution),
              show_default=True, help="Side length of the GAN and of every image the classifiers read.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Seeds the split, the fit and the synthetic sets; the classifiers use seed, seed+1, ...")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML file of TrainConfig fields for the fit, as `fit --config` (not its budget, resolution, seed "
                   "or conditional: augment sets those).")
@click.option("--merge", is_flag=True,
              help="Also write OUT/merged: DATA plus the chosen set as one augmented ImageFolder.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--threads", type=int, default=None,
              help="torch threads of the classifiers [default: 1 on the CPU, the second core augments the next batch].")
@click.option("--overwrite", is_flag=True, help="Start again in an OUT that holds an earlier augment (any settings).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of the summary.")
@verbosity_options
def command(data: Path, out: Path, minutes: float, kimg: float | None, unlabeled: Path | None, val_fraction: float,
            seeds: int, steps: int, ratios: tuple[float, ...], set_size: int, recipe: str, resolution: str, seed: int,
            config_file: Path | None, merge: bool, device: str, threads: int | None, overwrite: bool, as_json: bool,
            quiet: bool) -> None:
    """Find out whether synthetic images help a classifier on DATA (class subfolders), and keep the set that does.

    Holds out a stratified validation split, fits a conditional GAN on the rest within --minutes, writes
    candidate sets (synth; vary --interpolate, with --balance when the largest class has 3x the images of the
    smallest, which also adds synth --balance), each at every --ratios share, and trains the small CNN real-only and
    real+candidate with --seeds paired seeds (accuracy, or balanced accuracy on imbalanced classes). The best
    candidate whose mean gain is positive and larger than its standard error is written to OUT/synthetic with
    OUT/recipe.yaml; otherwise the answer is "no measurable gain". OUT/decision.json and OUT/report.html say
    why. Running the same command again resumes an interrupted run.

    \b
    Examples:
      augment-gan augment examples/digits --out augmented/digits --minutes 10
      augment-gan augment my-long-tail --out augmented/tail --seeds 5 --merge --json
    """
    from augment_gan.augment import augment, format_result
    from augment_gan.config import load_config_file

    config = AugmentConfig(
        minutes=None if kimg is not None else minutes, kimg=kimg, val_fraction=val_fraction, seeds=seeds,
        steps=steps, ratios=ratios, set_size=set_size, recipe=recipe, resolution=int(resolution), seed=seed,
        unlabeled=str(unlabeled) if unlabeled is not None else None,
        fit_options=load_config_file(config_file) if config_file is not None else None,
        merge=merge, device=device, threads=threads, overwrite=overwrite, progress=not quiet)
    result = augment(data, out, config)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_result(result))
