"""The `augment-gan` command-line application: a thin click shell over the library.

Every command parses options, builds a config and calls one library function. Progress goes to
stderr, results to stdout; `--quiet` and `--verbose` (`augment_gan.cli.verbosity`) set how much of the
library's log and progress is shown. A `UserError` from the library, and any operating-system error (a read-only
or full disk, a missing path), becomes a one-line `Error: ...` message with a non-zero exit status; the
traceback is shown only with `--debug`.
"""
from __future__ import annotations

import importlib

import click

from augment_gan import __version__
from augment_gan.errors import UserError, os_error_message

# Command modules, imported when the group is built. Heavy imports (torch) live inside the command
# functions so that `augment-gan --help` stays fast.
_COMMAND_MODULES = ("inspect", "fit", "synth", "vary", "recipes", "merge", "evaluate", "report", "augment")


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(os_error_message(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="augment-gan")
@click.option("--debug", is_flag=True, envvar="AUGMENT_GAN_DEBUG",
              help="Show the full traceback of an operating-system error instead of one line.")
@click.pass_context
def app(ctx: click.Context, debug: bool) -> None:
    """Synthetic data augmentation for small image folders.

    \b
    Example (the whole pipeline):
      augment-gan inspect examples/digits
      augment-gan fit examples/digits --out runs/digits --minutes 2
      augment-gan synth runs/digits --n 1000 --out synthetic/digits
      augment-gan evaluate --real examples/digits --synthetic synthetic/digits
    """
    ctx.obj = {"debug": debug}


for _name in _COMMAND_MODULES:
    _module = importlib.import_module(f"augment_gan.cli.{_name}")
    app.add_command(_module.command)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="augment-gan")
