"""`augment-gan fit` (placeholder until its issue lands)."""
import click


@click.command("fit")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("fit is not built yet")
