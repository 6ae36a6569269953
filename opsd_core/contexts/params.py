"""Params of the built-in context builders, validated from the ``[context]`` section (torch-free)."""

from __future__ import annotations

from pydantic import Field

from opsd_core.config.base import PluginParams


class PaperContextParams(PluginParams):
    """The paper's layout with the backend's prompt texts; each text set here replaces the backend's."""

    system_prompt: str | None = Field(
        None, description="System prompt of both contexts (None: the backend's own).", min_length=1
    )
    ref_intro: str | None = Field(
        None,
        description="Teacher context: the text before the visual thought (None: the backend's, the paper's "
        "Appendix E text for the shipped backends).",
        min_length=1,
    )
    transition: str | None = Field(
        None,
        description="Teacher context: the text after the visual thought (None: the backend's, the paper's "
        "Appendix E text for the shipped backends).",
        min_length=1,
    )
