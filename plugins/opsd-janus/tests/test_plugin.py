"""The plugin's light side: registration without torch, and the shipped example configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core.testing.cli import cli

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_the_plugin_module_and_params_import_no_torch():
    code = "import sys, opsd_janus.plugin, opsd_janus.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_backend_is_listed():
    result = CliRunner().invoke(cli, ["list", "backends"])
    assert result.exit_code == 0 and "janus-pro" in result.output, result.output


@pytest.mark.parametrize("name", ["janus-pro-debug.toml", "janus-pro.toml"])
def test_shipped_example_configs_validate(name):
    result = CliRunner().invoke(cli, ["validate", str(EXAMPLES / name)])
    assert result.exit_code == 0, result.output
