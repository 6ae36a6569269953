"""Base classes of every config model (no torch import here or anywhere in this package).

Owns: the strictness every section shares (unknown keys are errors, assignments validated).
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    """A config section: unknown keys are errors, every field carries a description, no float
    may be infinite or NaN (a run would train on NaN and still exit 0), and booleans are
    neither numbers nor read from strings (``seed = true`` or ``opsd = "yes"`` is a mistake)."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        kinds = _plain_types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise PydanticCustomError("bool_not_number", "Input should be a number, not true or false")
        if bool in kinds and kinds <= {bool, type(None)} and value is not None and not isinstance(value, bool):
            raise PydanticCustomError("bool_strict", "Input should be true or false (a TOML boolean)")
        return value


def _plain_types(annotation: Any) -> set[Any]:
    """The types a field annotation admits, with unions, optionals and ``Annotated`` opened."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _plain_types(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return set().union(*(_plain_types(argument) for argument in get_args(annotation)))
    return {annotation}


class PluginParams(Section):
    """Base of the params model a plugin registers for a backend, task, divergence or teacher.

    Subclass it and describe every field with ``Field(description=...)``; the plugin's config
    section (e.g. ``[backend]``) is validated by it, plus the ``name`` key that selects the
    plugin.
    """
