"""`augment-gan report` (placeholder until its issue lands)."""
import click


@click.command("report")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("report is not built yet")
