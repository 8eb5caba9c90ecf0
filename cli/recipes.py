"""`augment-gan recipes` (placeholder until its issue lands)."""
import click


@click.command("recipes")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("recipes is not built yet")
