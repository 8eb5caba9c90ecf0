"""`augment-gan report RUN_DIR`: one self-contained HTML page about a training run."""
from __future__ import annotations

import click

from augment_gan.cli.verbosity import verbosity_options


@click.command("report")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--real", type=click.Path(exists=True, file_okay=False),
              help="Real folder: with --synthetic, compute and include the evaluate metrics.")
@click.option("--synthetic", type=click.Path(exists=True, file_okay=False),
              help="Synthetic folder written by `augment-gan synth` from this run.")
@click.option("--metrics", "metrics_file", type=click.Path(exists=True, dir_okay=False),
              help="Include a metrics.json from `augment-gan evaluate --out` instead of recomputing.")
@click.option("--downstream", is_flag=True, help="With --real/--synthetic: also run the downstream classifier test.")
@click.option("--out", type=click.Path(dir_okay=False), help="HTML file to write [default: RUN_DIR/report.html].")
@click.option("--overwrite", is_flag=True, help="Replace an existing report.")
@verbosity_options
def command(run_dir, real, synthetic, metrics_file, downstream, out, overwrite, quiet):
    """Write an HTML report of a training run: sample grids (one row per class when conditional), loss
    and adaptive-augmentation curves, and, given --real and --synthetic (or --metrics), the synthetic
    set's metrics with its nearest real neighbours. Images are embedded: the file stands alone.
    Needs matplotlib (pip install 'augment-gan[report]').

    \b
    Examples:
      augment-gan report runs/digits
      augment-gan report runs/digits --real examples/digits --synthetic synthetic/digits --out digits.html
      augment-gan evaluate --real examples/digits --synthetic synthetic/digits --out eval/digits
      augment-gan report runs/digits --metrics eval/digits/metrics.json
    """
    if downstream and not real:
        raise click.UsageError("--downstream needs --real and --synthetic")
    from augment_gan.evaluate import EvaluateConfig
    from augment_gan.report import write_report

    path = write_report(run_dir, out, real=real, synthetic=synthetic, metrics_file=metrics_file,
                        eval_config=EvaluateConfig(downstream=downstream), overwrite=overwrite,
                        progress=not quiet)
    click.echo(str(path))
