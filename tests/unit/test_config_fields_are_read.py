"""Every config field the core defines is read by some code: a field nothing reads would
silently do nothing when a user sets it."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
from pydantic import BaseModel

from opsd_core.config import LoraSection, RunConfig
from opsd_core.contexts.params import PaperContextParams
from opsd_core.divergences.params import JsdParams, KlParams
from opsd_core.sampling.params import BatchedSamplerParams
from opsd_core.teachers.params import EmaParams, FrozenParams

ROOT = Path(__file__).resolve().parents[2]
# Where fields are defined, not read.
DEFINITIONS = {ROOT / "opsd_core" / "config"} | {
    ROOT / "opsd_core" / package / "params.py" for package in ("contexts", "divergences", "sampling", "teachers")
}
SECTIONS = [
    annotation
    for field in RunConfig.model_fields.values()
    if isinstance(annotation := field.annotation, type) and issubclass(annotation, BaseModel)
]
MODELS = [*SECTIONS, LoraSection, PaperContextParams, JsdParams, KlParams, BatchedSamplerParams, EmaParams, FrozenParams]


def _reading_files() -> list[Path]:
    files = list((ROOT / "opsd_core").rglob("*.py")) + list(ROOT.glob("plugins/*/src/**/*.py"))
    return [f for f in files if not any(f == d or d in f.parents for d in DEFINITIONS)]


@cache
def names_read() -> frozenset[str]:
    """Attribute names accessed and string constants used (``getattr``, dict keys) in the code."""
    found = set()
    for path in _reading_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                found.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return frozenset(found)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_read_somewhere(model):
    unread = [name for name in model.model_fields if name != "name" and name not in names_read()]
    assert not unread, f"{model.__name__} fields that no code reads: {unread}"


def test_the_check_finds_a_field_nobody_reads():
    class Dead(BaseModel):
        a_field_that_nothing_in_the_project_reads: int = 0

    assert "a_field_that_nothing_in_the_project_reads" not in names_read()
