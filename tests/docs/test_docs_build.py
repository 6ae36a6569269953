"""The documentation builds with Sphinx with warnings as errors, and its generated reference
covers every CLI command and every config field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from opsd_core.cli import cli
from opsd_core.config import RunConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q", str(DOCS), str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _commands(group: click.Group, prefix: str = "opsd") -> list[str]:
    names = []
    for name, command in group.commands.items():
        names.append(f"{prefix} {name}")
        if isinstance(command, click.Group):
            names += _commands(command, f"{prefix} {name}")
    return names


def test_every_cli_command_is_in_the_reference(built):
    page = (built / "reference" / "cli.html").read_text()
    missing = [name for name in _commands(cli) if name not in page]
    assert not missing, f"commands missing from the CLI reference: {missing}"


def test_every_config_field_is_in_the_reference(built):
    page = (built / "reference" / "config.html").read_text()
    missing = []
    for section_name, field in RunConfig.model_fields.items():
        section = field.annotation
        for name in getattr(section, "model_fields", {}):
            if name not in page:
                missing.append(f"{section_name}.{name}")
    assert not missing, f"config fields missing from the reference: {missing}"


def test_every_page_is_in_a_table_of_contents(built):
    pages = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    index = (DOCS / "index.md").read_text()
    assert not [page for page in pages if f"\n{page}\n" not in index]
