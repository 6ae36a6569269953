"""The documentation builds with Sphinx with warnings as errors, and its generated reference
covers every CLI command and every config field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from opsd_core.config import RunConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


_LIST_COMMANDS = """
import click
from opsd_core.cli import cli

def walk(group, prefix):
    for name, command in group.commands.items():
        print(f"{prefix} {name}")
        if isinstance(command, click.Group):
            walk(command, f"{prefix} {name}")

walk(cli, "opsd")
"""


@pytest.mark.docs
def test_every_cli_command_is_in_the_reference(built):
    # A fresh process: other tests may add commands to the in-process group through plugins.
    listed = subprocess.run([sys.executable, "-c", _LIST_COMMANDS], capture_output=True, text=True, check=True)
    commands = listed.stdout.split("\n")
    page = (built / "reference" / "cli.html").read_text()
    missing = [name for name in commands if name and name not in page]
    assert not missing, f"commands missing from the CLI reference: {missing}"


@pytest.mark.docs
def test_every_config_field_is_in_the_reference(built):
    page = (built / "reference" / "config.html").read_text()
    missing = []
    for section_name, field in RunConfig.model_fields.items():
        section = field.annotation
        for name in getattr(section, "model_fields", {}):
            if name not in page:
                missing.append(f"{section_name}.{name}")
    assert not missing, f"config fields missing from the reference: {missing}"


def test_every_page_is_in_a_table_of_contents():
    # Reads the sources only: no build needed (the build is the docs tier's).
    pages = {p.stem for p in DOCS.glob("*.md")} - {"index"}
    index = (DOCS / "index.md").read_text()
    assert not [page for page in pages if f"\n{page}\n" not in index]
