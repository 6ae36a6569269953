"""Params models of the built-in divergences, validated from the ``[divergence]`` section.

Owns: the fields, defaults (the paper's: beta 0.5, top-K 256, per-entry clip 0.05, tau 1)
and constraints of ``jsd``, ``kl`` and ``reverse-kl``.
Does not know: torch; this module is imported when configs are validated and must stay
light (``opsd validate`` never imports torch).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opsd_core.config.base import PluginParams

_TOP_K = "Size K of the teacher's top-K support over which both distributions are renormalised; "
_CHUNK_SIZE = (
    "Rows computed at a time by the memory-bounded path; None sizes blocks automatically "
    "(about 2**23 working elements)."
)
_TEMPERATURE = "Softmax temperature tau; logits are divided by it and the loss is multiplied by tau**2."


class JsdParams(PluginParams):
    """Generalized JSD_beta over the teacher's top-K with clipping (``jsd``, the paper's loss)."""

    beta: float = Field(
        0.5,
        description="Mixture weight beta of m = beta * p_T + (1 - beta) * p_S; 0 is forward KL, 1 is reverse KL.",
        ge=0.0,
        le=1.0,
    )
    top_k: int | None = Field(
        256, description=_TOP_K + "None, or K >= the vocabulary size, uses the whole vocabulary.", ge=1
    )
    clip: float | None = Field(
        0.05, description="Cap c on the loss terms (see clip_mode); capped terms pass no gradient. None: no cap.", gt=0.0
    )
    clip_mode: Literal["entry", "token"] = Field(
        "entry",
        description="'entry' caps each vocabulary entry's term before the sum (the paper's code); 'token' caps the per-token sum.",
    )
    temperature: float = Field(1.0, description=_TEMPERATURE, gt=0.0)
    chunk_size: int | None = Field(None, description=_CHUNK_SIZE, ge=1)
    fused: bool = Field(
        False,
        description="Compute the loss from the final hidden states and the lm_head weight "
        "(fused_topk_jsd) instead of full logits, so the student's (N, V) logits never exist; "
        "needs a top_k and a backend that provides completion_hidden. The kl metric is then over "
        "the teacher's top-K support.",
    )

    @model_validator(mode="after")
    def _fused_needs_a_top_k(self) -> JsdParams:
        if self.fused and self.top_k is None:
            raise ValueError(
                "fused = true computes the student's logits only at the teacher's top-K entries, so it needs "
                "top_k (got top_k = None); set top_k (the paper's is 256) or fused = false"
            )
        return self

    @model_validator(mode="after")
    def _entry_clip_needs_an_interior_beta(self) -> JsdParams:
        # At beta 0 or 1 the loss is a KL, whose per-entry terms take both signs: capping only
        # the positive ones makes rows negative and moves the minimum away from the teacher.
        if self.clip is not None and self.clip_mode == "entry" and self.beta in (0.0, 1.0):
            raise ValueError(
                f"beta={self.beta} makes the loss a KL whose per-entry terms can be negative, so "
                f"clip_mode='entry' (clip={self.clip}) would let it go below 0; use clip_mode='token', "
                "clip=None, or a beta strictly between 0 and 1"
            )
        return self


class KlParams(PluginParams):
    """KL divergence between the teacher's and the student's distributions (``kl``, ``reverse-kl``)."""

    top_k: int | None = Field(
        None, description=_TOP_K + "None, or K >= the vocabulary size, uses the whole vocabulary.", ge=1
    )
    temperature: float = Field(1.0, description=_TEMPERATURE, gt=0.0)
    chunk_size: int | None = Field(None, description=_CHUNK_SIZE, ge=1)
