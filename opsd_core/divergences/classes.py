"""The registered divergences: the functional API behind the Divergence role.

Owns: binding validated params to :mod:`opsd_core.divergences.functional`.
Does not know: anything beyond logits and masks.
"""

from __future__ import annotations

import torch

from opsd_core.divergences.functional import generalized_jsd, kl_divergence
from opsd_core.divergences.params import JsdParams, KlParams
from opsd_core.interfaces.divergence import Divergence


class JsdDivergence(Divergence):
    """``jsd``: generalized JSD_beta with top-K and clipping."""

    def __init__(self, params: JsdParams | None = None):
        self.params = params or JsdParams()

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.params
        return generalized_jsd(
            student_logits, teacher_logits, beta=p.beta, top_k=_fit(p.top_k, student_logits), clip=p.clip,
            clip_mode=p.clip_mode, temperature=p.temperature, mask=mask, reduction="none", chunk_size=p.chunk_size,
        )


class _Kl(Divergence):
    direction = "forward"

    def __init__(self, params: KlParams | None = None):
        self.params = params or KlParams()

    def per_token(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.params
        return kl_divergence(
            student_logits, teacher_logits, direction=self.direction, top_k=_fit(p.top_k, student_logits),
            temperature=p.temperature, mask=mask, reduction="none", chunk_size=p.chunk_size,
        )


class ForwardKlDivergence(_Kl):
    """``kl``: forward KL(teacher || student)."""

    direction = "forward"


class ReverseKlDivergence(_Kl):
    """``reverse-kl``: reverse KL(student || teacher)."""

    direction = "reverse"


def _fit(top_k: int | None, logits: torch.Tensor) -> int | None:
    """A configured top-K larger than this model's vocabulary means the whole vocabulary."""
    return None if top_k is None or top_k >= logits.shape[-1] else top_k
