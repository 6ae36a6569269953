"""The built-in commands that inspect plugins and configs.

Owns: ``opsd plugins``, ``opsd list``, ``opsd validate`` and ``opsd config``.
Does not know: torch; none of these commands imports it.
"""

from __future__ import annotations

import json

import click

_SET_HELP = "Override a config value: section.field=value (value parsed as a TOML literal). Repeatable."
_LIST_KINDS = {
    "backends": "backend",
    "tasks": "task",
    "divergences": "divergence",
    "teachers": "teacher",
    "samplers": "sampler",
    "contexts": "context",
    "loggers": "logger",
}


@click.command("plugins")
def plugins_command() -> None:
    """Print every loaded plugin as JSON: name, distribution, version and hooks."""
    from opsd_core.plugins import plugin_info

    click.echo(json.dumps(plugin_info(), indent=2))


@click.command("list")
@click.argument("kind", type=click.Choice(sorted(_LIST_KINDS)))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_command(kind: str, as_json: bool) -> None:
    """List the registered backends, tasks, divergences, teachers, samplers, contexts or loggers."""
    from opsd_core.plugins import get_registries

    registry = get_registries().of(_LIST_KINDS[kind])
    rows = [{"name": e.name, "plugin": e.plugin, "description": e.description} for e in registry]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no {kind} registered")
        return
    width = max(len(row["name"]) for row in rows)
    plugin_width = max(len(row["plugin"]) for row in rows)
    for row in rows:
        click.echo(f"{row['name']:<{width}}  {row['plugin']:<{plugin_width}}  {row['description']}")


def _set_option(function):
    return click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE", help=_SET_HELP)(
        function
    )


@click.command("validate")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@_set_option
def validate_command(config_path: str, overrides: tuple[str, ...]) -> None:
    """Check a run config: unknown keys, types, ranges and plugin names."""
    from opsd_core.config import load_config

    config = load_config(config_path, overrides)
    click.echo(
        f"{config_path}: valid (backend {config.backend.name}, task {config.task.name}, "
        f"divergence {config.divergence.name}, teacher {config.teacher.name})"
    )


@click.group("config")
def config_group() -> None:
    """Show resolved configs and the config schema."""


@config_group.command("show")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False), required=False)
@_set_option
def config_show(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (defaults < CONFIG < --set) as TOML."""
    from opsd_core.config import load_config, to_toml

    click.echo(to_toml(load_config(config_path, overrides)), nl=False)


@config_group.command("schema")
def config_schema() -> None:
    """Print the JSON schema of the run config, plugin sections included."""
    from opsd_core.config import config_model
    from opsd_core.plugins import get_registries

    click.echo(json.dumps(config_model(get_registries()).model_json_schema(), indent=2))


@click.command("examples")
@click.option(
    "--copy",
    "destination",
    type=click.Path(file_okay=False),
    help="Copy every shipped config into this directory (existing files are never replaced).",
)
def examples_command(destination: str | None) -> None:
    """List the run configs installed with opsd, or copy them to edit."""
    import shutil
    from pathlib import Path

    from opsd_core.cli.shipped import SHIPPED_CONFIGS, shipped_config_names

    names = shipped_config_names()
    if destination is None:
        for name in names:
            lines = (SHIPPED_CONFIGS / f"{name}.toml").read_text(encoding="utf-8").splitlines()
            summary = lines[0].lstrip("# ").strip() if lines and lines[0].startswith("#") else ""
            click.echo(f"{name:<20}  {summary}")
        click.echo(f"(in {SHIPPED_CONFIGS}; `opsd run --backend NAME` runs NAME.toml)")
        return
    target = Path(destination)
    clashes = [name for name in names if (target / f"{name}.toml").exists()]
    if clashes:
        raise click.ClickException(
            f"{target} already holds {', '.join(f'{name}.toml' for name in clashes)}; nothing was copied"
        )
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(SHIPPED_CONFIGS / f"{name}.toml", target / f"{name}.toml")
    click.echo(f"copied {len(names)} configs to {target}")


def add_builtin_commands(cli: click.Group) -> None:
    """Register the built-in commands on the ``opsd`` group."""
    for command in (plugins_command, list_command, validate_command, config_group, examples_command):
        cli.add_command(command)
