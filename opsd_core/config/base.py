"""Base classes of every config model (no torch import here or anywhere in this package).

Owns: the strictness every section shares (unknown keys are errors, assignments validated).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors, every field carries a description, and no
    float may be infinite or NaN (a run would train on NaN and still exit 0)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


class PluginParams(Section):
    """Base of the params model a plugin registers for a backend, task, divergence or teacher.

    Subclass it and describe every field with ``Field(description=...)``; the plugin's config
    section (e.g. ``[backend]``) is validated by it, plus the ``name`` key that selects the
    plugin.
    """
