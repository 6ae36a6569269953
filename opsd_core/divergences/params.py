"""Params of the built-in divergences (torch-free: imported when configs are validated)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from opsd_core.config.base import PluginParams


class JsdParams(PluginParams):
    """Generalized JSD_beta over the teacher's top-K; defaults are the paper's."""

    beta: float = Field(0.5, description="Mixture weight: 0 = forward KL, 1 = reverse KL.", ge=0.0, le=1.0)
    top_k: int | None = Field(256, description="Teacher top-K support (None: the full vocabulary).", ge=1)
    clip: float | None = Field(0.05, description="Cap on the loss terms (None: no cap).", gt=0.0)
    clip_mode: Literal["entry", "token"] = Field(
        "entry", description="'entry' caps each vocabulary entry's term, 'token' caps the per-token sum."
    )
    temperature: float = Field(1.0, description="Softmax temperature; the loss is scaled by its square.", gt=0.0)
    chunk_size: int | None = Field(None, description="Rows computed at a time (None: sized from V).", ge=1)


class KlParams(PluginParams):
    """KL divergence between the teacher's and the student's distributions."""

    top_k: int | None = Field(None, description="Teacher top-K support (None: the full vocabulary).", ge=1)
    temperature: float = Field(1.0, description="Softmax temperature; the loss is scaled by its square.", gt=0.0)
    chunk_size: int | None = Field(None, description="Rows computed at a time (None: sized from V).", ge=1)
