"""What every distribution of this repository promises its users beyond the code: the same CLI
under ``python -m opsd_core``, the license file shipped with each, and a test toolkit that says
how to install what it needs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROJECTS = sorted(path.parent for path in [REPO / "pyproject.toml", *REPO.glob("plugins/*/pyproject.toml"), *REPO.glob("examples/*/pyproject.toml")])


def _run(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, cwd=REPO, check=False)


def test_python_dash_m_opsd_core_is_the_opsd_command():
    as_module = _run("-m", "opsd_core", "list", "divergences", "--json")
    as_script = _run("-c", "from opsd_core.cli import main; main()", "list", "divergences", "--json")
    assert as_module.returncode == 0, as_module.stderr
    assert as_module.stdout == as_script.stdout and "jsd" in as_module.stdout
    helped = _run("-m", "opsd_core", "run", "--help")
    assert helped.returncode == 0 and "--set" in helped.stdout


@pytest.mark.parametrize("project", PROJECTS, ids=lambda path: path.name if path != REPO else "opsd-core")
def test_every_distribution_ships_the_apache_license(project):
    metadata = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    assert metadata["license"] == "Apache-2.0"
    assert metadata["license-files"] == ["LICENSE"]
    assert (project / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0" in (REPO / "LICENSE").read_text()


def test_the_testing_toolkit_names_the_extra_when_its_tools_are_missing():
    hidden = "import sys; sys.modules['hypothesis'] = None; import opsd_core.testing"
    failed = _run("-c", hidden)
    assert failed.returncode != 0
    assert "opsd_core.testing needs hypothesis" in failed.stderr and "opsd-core[test]" in failed.stderr
