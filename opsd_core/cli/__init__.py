"""The ``opsd`` command line (click).

Owns: the top-level group, adding commands (the built-in ones and the plugins', through one call of
the ``register_commands`` hook), and turning framework errors into one clear line with a non-zero exit.
Does not know: torch or model code at import time; commands import what they need when run.
"""

from __future__ import annotations

import sys

import click

from opsd_core.cli.builtin import add_builtin_commands
from opsd_core.cli.plan import plan_command
from opsd_core.cli.run import add_run_commands
from opsd_core.cli.sweep import add_sweep_commands
from opsd_core.errors import OpsdError, is_out_of_memory, log_traceback


def register_builtin_commands(cli: click.Group) -> None:
    """The built-in commands, added through the ``register_commands`` hook like a plugin's."""
    add_builtin_commands(cli)
    add_run_commands(cli)
    add_sweep_commands(cli)
    cli.add_command(plan_command)


class _OpsdGroup(click.Group):
    """Adds plugin commands on first use and prints framework errors without a traceback."""

    _plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from opsd_core.plugins import get_plugin_manager

        get_plugin_manager().hook.register_commands.call_extra([register_builtin_commands], {"cli": self})

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OpsdError as error:
            raise click.ClickException(str(error)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as error:
            where = f" ({error.filename})" if error.filename else ""
            log = log_traceback()
            raise click.ClickException(
                f"{error.strerror or error}{where}: the operating system refused a file operation (a read-only "
                f"or full disk, a missing directory, permissions); full traceback in {log}"
            ) from None
        except Exception as error:
            log = log_traceback()
            if is_out_of_memory(error):
                raise click.ClickException(
                    f"CUDA ran out of memory: the model and its batches do not fit this GPU; lower the batch size or "
                    f"see `opsd plan` for what fits; full traceback in {log}"
                ) from None
            raise click.ClickException(
                f"unexpected {type(error).__name__}: {error}. Unless the message points at your input or data, "
                f"this is a bug in opsd or a plugin: please report it with the full traceback, written to {log}"
            ) from None


@click.group(cls=_OpsdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="opsd-core", prog_name="opsd")
def cli() -> None:
    """Cross-modal on-policy self-distillation (Visual-OPSD) for unified multimodal models.

    Run `opsd run` for the embedded default, `opsd list backends` to see what is installed.
    Set OPSD_LOAD_PLUGINS='' to start without external plugins (e.g. when one is broken).
    """


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(standalone_mode=True)
    except OpsdError as error:  # raised while building the command list, before invoke
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
