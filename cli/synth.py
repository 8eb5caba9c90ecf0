"""`augment-gan synth` (placeholder until its issue lands)."""
import click


@click.command("synth")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("synth is not built yet")
