"""`augment-gan merge` (placeholder until its issue lands)."""
import click


@click.command("merge")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("merge is not built yet")
