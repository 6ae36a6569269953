"""Params of the total-variation divergence (torch-free)."""

from pydantic import Field

from opsd_core.config import PluginParams


class TotalVariationParams(PluginParams):
    """Total-variation distance between the teacher's and the student's distributions."""

    top_k: int | None = Field(None, description="Teacher top-K support (None: the full vocabulary).", ge=1)
