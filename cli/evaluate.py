"""`augment-gan evaluate --real DIR --synthetic DIR`: is the synthetic set close, diverse, novel and useful?"""
from __future__ import annotations

import json

import click

from augment_gan.cli.verbosity import verbosity_options
from augment_gan.data import RESOLUTIONS
from augment_gan.evaluate import EvaluateConfig, evaluate, format_result

_DEFAULTS = EvaluateConfig()  # the options' defaults are the config's


@click.command("evaluate")
@click.option("--real", "real", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of real images (class subfolders for --downstream, --probe and classifier features).")
@click.option("--synthetic", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of synthetic images, e.g. written by `augment-gan synth`.")
@click.option("--features", default="auto", show_default=True,
              help="Feature space: auto (classifier if --real is labeled, else random), classifier, random, "
                   "inception, pixels (16x16 downsampled, synth --dedup's space), or a path to FID Inception weights.")
@click.option("--inception-weights", type=click.Path(exists=True, dir_okay=False),
              help="Local FID Inception-v3 weights (torch-fidelity's .pth); nothing is ever downloaded.")
@click.option("--resolution", type=click.Choice([str(r) for r in RESOLUTIONS]),
              help="Side length both folders are read at [default: 32 for synthetic images up to 32 px, else 64].")
@click.option("--feature-steps", type=click.IntRange(min=1), default=_DEFAULTS.feature_steps, show_default=True,
              help="Training steps of the feature classifier (keep fixed when comparing runs).")
@click.option("--downstream", is_flag=True,
              help="Train a small CNN on real-only and real+synthetic, report held-out accuracy.")
@click.option("--seeds", type=click.IntRange(min=1), default=_DEFAULTS.seeds, show_default=True,
              help="Downstream runs per arm.")
@click.option("--steps", type=click.IntRange(min=1), default=_DEFAULTS.steps, show_default=True,
              help="Optimizer steps per downstream run (the same for both arms); more for large folders.")
@click.option("--batch-size", type=click.IntRange(min=2), default=_DEFAULTS.batch_size, show_default=True,
              help="Batch size of the downstream classifiers.")
@click.option("--recipe", default=_DEFAULTS.recipe, show_default=True,
              help="Augmentation recipe for downstream training (name or YAML path; `none` to disable).")
@click.option("--synthetic-ratio", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of synthetic images per batch [default: the recipe's ratio].")
@click.option("--test", "test_dir", type=click.Path(exists=True, file_okay=False),
              help="Held-out real folder for --downstream (default: hold out 30% of --real).")
@click.option("--probe", type=click.Path(exists=True),
              help="Run dir or checkpoint: linear-probe its discriminator's features on --real.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Seeds the classifiers, the held-out split and the metrics' subsets (same seed, same numbers).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads [default: 1 on the CPU, the second core augments the next batch].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Also write metrics.json and pairs.png (closest synthetic/real pairs) here.")
@click.option("--overwrite", is_flag=True, help="Replace metrics.json / pairs.png in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@verbosity_options
def command(real, synthetic, features, inception_weights, resolution, feature_steps, downstream, seeds, steps,
            batch_size, recipe, synthetic_ratio, test_dir, probe, seed, device, threads, out_dir, overwrite, as_json,
            quiet):
    """Compare a synthetic image folder with the real one.

    Reports the Fréchet distance and KID, precision/recall and density/coverage, and the share of
    synthetic images that are near-copies of real ones, all in a named feature space (only
    --features inception gives numbers comparable with published FID). --downstream answers the
    question that matters: does a classifier get better with the synthetic images?

    \b
    Examples:
      augment-gan evaluate --real examples/digits --synthetic synthetic/digits
      augment-gan evaluate --real examples/digits --synthetic synthetic/digits \\
          --downstream --seeds 3 --out eval/digits --json
      augment-gan evaluate --real photos --synthetic synth --features inception \\
          --inception-weights weights-inception-2015-12-05-6726825d.pth
    """
    config = EvaluateConfig(
        features=features, inception_weights=inception_weights,
        resolution=int(resolution) if resolution else None, feature_steps=feature_steps,
        downstream=downstream, seeds=seeds, steps=steps, batch_size=batch_size, recipe=recipe,
        synthetic_ratio=synthetic_ratio, test_dir=test_dir, probe=probe, seed=seed, device=device, threads=threads)
    result = evaluate(real, synthetic, config, out_dir=out_dir, overwrite=overwrite, progress=not quiet)
    click.echo(json.dumps(result) if as_json else format_result(result))
