"""Params of the built-in teacher updates (torch-free)."""

from __future__ import annotations

from pydantic import Field

from opsd_core.config.base import PluginParams


class EmaParams(PluginParams):
    """Exponential moving average of the student."""

    decay: float = Field(
        0.995, description="EMA decay: teacher <- decay * teacher + (1 - decay) * student.", ge=0.0, le=1.0
    )


class FrozenParams(PluginParams):
    """The teacher keeps the starting weights for the whole run."""
