"""Every shipped config parses and validates."""

from pathlib import Path

import pytest

from opsd_core.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(ROOT.glob("examples/**/*.toml")) + sorted(ROOT.glob("tests/**/data/*.toml"))


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in CONFIGS if p.name != "pyproject.toml"])
def test_shipped_config_validates(path):
    load_config(path)
