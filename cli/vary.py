"""`augment-gan vary` (placeholder until its issue lands)."""
import click


@click.command("vary")
def command() -> None:
    """Not built yet."""
    raise click.ClickException("vary is not built yet")
