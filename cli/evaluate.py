"""`augment-gan evaluate` (placeholder until its issue lands)."""
import click


@click.command("evaluate")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("evaluate is not built yet")
