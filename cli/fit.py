"""`augment-gan fit`: train a GAN on an image folder."""
from __future__ import annotations

import os
from pathlib import Path

import click
from click.core import ParameterSource

from augment_gan.cli.verbosity import verbosity_options
from augment_gan.config import TrainConfig
from augment_gan.data import FITS, MODEL_RESOLUTIONS
from augment_gan.device import DEVICE_CHOICES
from augment_gan.pseudolabel import CONFIDENCE

_DEFAULTS = TrainConfig()  # the options' defaults are the config's, so the two cannot drift apart

# Options that map 1:1 onto TrainConfig fields.
_CONFIG_OPTIONS = {"resolution": "resolution", "minutes": "minutes", "kimg": "kimg", "batch_size": "batch_size",
                   "seed": "seed", "fit_mode": "fit", "checkpoint_minutes": "checkpoint_minutes"}


def _print_config(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from augment_gan.config import config_yaml

    click.echo(config_yaml(), nl=False)
    ctx.exit()


@click.command("fit")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: runs/<folder name>).")
@click.option("--resolution", type=click.Choice([str(r) for r in MODEL_RESOLUTIONS]), default=str(_DEFAULTS.resolution),
              show_default=True,
              callback=lambda c, p, v: int(v), help="Square training resolution.")
@click.option("--minutes", type=float, default=_DEFAULTS.minutes, show_default=True, help="Wall-clock training budget.")
@click.option("--kimg", type=float, default=None, help="Budget in thousands of real images shown (overrides --minutes).")
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True,
              help="Global batch size (small batches mean more updates per CPU-minute; try 64+ on a GPU).")
@click.option("--device", type=str, default="auto", show_default=True, help=f"One of {', '.join(DEVICE_CHOICES)} or cuda:N.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Seeds the networks' initialisation and every random draw of training (same seed, same run).")
@click.option("--resume", is_flag=True, help="Continue the latest checkpoint in --out exactly where it stopped.")
@click.option("--checkpoint", "checkpoint", type=click.Path(path_type=Path), default=None,
              help="With --resume: continue from this checkpoint of the run instead of its newest (e.g. when the "
                   "newest is damaged); later checkpoints move to checkpoints/superseded/.")
@click.option("--unconditional", is_flag=True, help="Ignore class subfolders.")
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="A few labeled images (class subfolders) for an unlabeled FOLDER: a classifier trained on them "
                   "labels FOLDER, and the run trains class-conditionally on the labeled and confidently "
                   "labeled images.")
@click.option("--label-confidence", type=float, default=CONFIDENCE, show_default=True,
              help="--labels: an image of FOLDER is trained on when the classifier's softmax probability is at "
                   "least this.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="YAML file of TrainConfig fields (command-line options win); start from --print-config.")
@click.option("--print-config", is_flag=True, is_eager=True, expose_value=False, callback=_print_config,
              help="Print every TrainConfig field with its default and doc as YAML (a --config file), and exit.")
@click.option("--fit", "fit_mode", type=click.Choice(list(FITS)), default=_DEFAULTS.fit,
              show_default=True, help="How non-square images become square.")
@click.option("--checkpoint-minutes", type=float, default=_DEFAULTS.checkpoint_minutes, show_default=True,
              help="Save a checkpoint and a sample grid this often (and always at the end).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where decoded images are cached (default: RUN/cache).")
@verbosity_options
@click.pass_context
def command(ctx: click.Context, folder: Path, out: Path | None, device: str, resume: bool, checkpoint: Path | None,
            unconditional: bool, labels: Path | None, label_confidence: float, config_file: Path | None,
            cache_dir: Path | None, quiet: bool, **options) -> None:
    """Train a generator and discriminator on the images in FOLDER.

    Class subfolders (the torchvision ImageFolder layout) make the model class-conditional; for an unlabeled
    FOLDER, --labels DIR (a few labeled images) pseudo-labels it first (RUN/pseudo_labels.json). Writes
    checkpoints (safetensors + JSON), sample grids, log.jsonl and config.json into the run directory.

    \b
    Examples:
      augment-gan fit examples/digits --out runs/digits --minutes 2
      augment-gan fit ./photos --resolution 64 --kimg 200 --device cuda
      augment-gan fit examples/digits --out runs/digits --resume --minutes 10
      augment-gan fit ./unlabeled --labels ./labeled --out runs/pseudo --minutes 10
      augment-gan fit --print-config > my.yaml   # edit, then: fit FOLDER --config my.yaml
      torchrun --nproc_per_node 2 -m augment_gan fit examples/digits --out runs/ddp
    """
    from augment_gan.checkpoint import read_meta, resume_point
    from augment_gan.config import TrainConfig, load_config_file
    from augment_gan.errors import UserError
    from augment_gan.pseudolabel import LabelerConfig
    from augment_gan.train import fit

    out = out if out is not None else Path("runs") / (folder.resolve().name or "run")
    if labels is None and ctx.get_parameter_source("label_confidence") != ParameterSource.DEFAULT:
        raise UserError("--label-confidence needs --labels")
    labeler = LabelerConfig(confidence=label_confidence)
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) != ParameterSource.DEFAULT}
    if "kimg" in given:
        given["minutes"] = None
    if resume:
        base = read_meta(resume_point(out, checkpoint)).config.to_dict()
        if config_file is not None:
            raise UserError("--resume takes the run's saved config; --config cannot change it")
    else:
        base = {_CONFIG_OPTIONS[k]: v for k, v in options.items()}
        if base["kimg"] is not None:
            base["minutes"] = None
        if config_file is not None:
            file_values = load_config_file(config_file)
            base.update(file_values)
            if "kimg" in file_values and "minutes" not in file_values:
                base["minutes"] = None
        if unconditional:
            base["conditional"] = False
    base.update({_CONFIG_OPTIONS[k]: v for k, v in given.items()})
    config = TrainConfig.from_dict(base)
    path = fit(folder, config, out, resume=resume, device=device, cache_dir=cache_dir, progress=not quiet,
               checkpoint=checkpoint, labels=labels, labeler=labeler)
    if int(os.environ.get("RANK", "0")) != 0:   # under torchrun, rank 0 prints the summary
        return
    meta = read_meta(path)
    grid = out / "grids" / f"grid-{meta.step:08d}.png"
    click.echo(f"trained {meta.step:,} steps ({meta.kimg:.2f} kimg) in {meta.elapsed_s / 60:.1f} "
               f"{'CPU-' if config.clock == 'cpu' else ''}minutes; final adaptive augmentation p {meta.ada_p:.3f}")
    click.echo(f"checkpoint: {path}")
    click.echo(f"samples:    {grid}")
    if meta.data.labels is not None:
        info = meta.data.labels
        counts = ", ".join(f"{c}: {n}" for c, n in zip(meta.classes, info.pseudo_counts))
        accuracy = (f"; the classifier scored {info.classifier_accuracy:.1%} on held-out labeled images"
                    if info.classifier_accuracy is not None else "")
        click.echo(f"labels:     {info.labeled_images} labeled + {sum(info.pseudo_counts)} pseudo-labeled images "
                   f"at confidence >= {info.confidence:g} ({counts}){accuracy}; {out / 'pseudo_labels.json'}")
