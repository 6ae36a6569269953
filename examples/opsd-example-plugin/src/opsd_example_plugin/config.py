"""Params of the ``total-variation`` divergence, validated from the ``[divergence]`` section.

Owns: the fields, defaults and constraints of total-variation.
Does not know: torch; configs are validated without importing it.
"""

from pydantic import Field

from opsd_core.api import PluginParams


class TotalVariationParams(PluginParams):
    """Total-variation distance between the teacher's and the student's distributions."""

    top_k: int | None = Field(
        None,
        description=(
            "Size K of the teacher's top-K support over which both distributions are renormalised; "
            "None, or K >= the vocabulary size, uses the whole vocabulary."
        ),
        ge=1,
    )
