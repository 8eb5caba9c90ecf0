"""`augment-gan recipes list|show`: the shipped augmentation recipes."""
from __future__ import annotations

import json

import click

from augment_gan.recipes import PARTS


@click.group("recipes")
def command() -> None:
    """List the shipped augmentation recipes or show one.

    A recipe is an albumentations pipeline for real images (and optionally another for synthetic
    images) plus the real:synthetic mix. Use one in Python with
    `augment_gan.load_recipe(NAME)`, or on disk with `augment-gan merge --recipe NAME`.

    \b
    Example:
      augment-gan recipes list
      augment-gan recipes show standard > my-recipe.yaml   # edit, then --recipe my-recipe.yaml
    """


@command.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print names, descriptions and mix as JSON.")
def list_command(as_json: bool) -> None:
    """Names and one-line descriptions of the shipped recipes.

    \b
    Example:
      augment-gan recipes list
    """
    from augment_gan.recipes import list_recipes, load_recipe

    rows = []
    for name in list_recipes():
        recipe = load_recipe(name)
        rows.append({"name": name, "description": recipe.description, "use_synthetic": recipe.use_synthetic,
                     "synthetic_ratio": recipe.synthetic_ratio})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        click.echo(f"{row['name']:<{width}}  {row['description']}")


@command.command("show")
@click.argument("name")
@click.option("--part", type=click.Choice(PARTS), default=None,
              help="Print only this pipeline, in the form albumentations.load(path, data_format='yaml') reads.")
def show_command(name: str, part: str | None) -> None:
    """Print a recipe's YAML (a shipped name, or a path to a recipe file, which is checked first).

    With --part, print one pipeline as albumentations serialises it: the file loads with
    `albumentations.load(path, data_format="yaml")`, and a file written by `albumentations.save` loads
    as a recipe (`--recipe PATH`, `load_recipe(PATH)`) with the default mix.

    \b
    Examples:
      augment-gan recipes show heavy
      augment-gan recipes show standard --part real > real.yaml   # for albumentations.load
    """
    from augment_gan.recipes import export_part, load_recipe, read_recipe_text

    if part is not None:
        click.echo(export_part(name, part), nl=False)
        return
    load_recipe(name)  # a file that does not load is an error, not something to copy
    click.echo(read_recipe_text(name)[1], nl=False)
