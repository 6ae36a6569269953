"""The ``jsd`` divergence: the generalized JSD_beta of the paper behind the Divergence role.

Owns: binding validated :class:`~opsd_core.divergences.params.JsdParams` to
:func:`~opsd_core.divergences.functional.generalized_jsd`.
Does not know: the formula (the functional API owns it), reductions over rows and samples
(the trainer owns them), images or backends.
"""

from __future__ import annotations

import torch

from opsd_core.divergences.functional import fit_top_k, generalized_jsd
from opsd_core.divergences.params import JsdParams
from opsd_core.interfaces.divergence import Divergence


class JsdDivergence(Divergence):
    """Per-token generalized JSD_beta over the teacher's top-K, clipped (defaults: the paper's)."""

    def __init__(self, params: JsdParams | None = None):
        self.params = params if params is not None else JsdParams()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    def per_token(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 (...) loss of each row, 0 where ``mask`` is False (float64 for float64 inputs).

        Args:
            student_logits: float (..., V); gradients flow into it.
            teacher_logits: float (..., V); never receives gradient.
            mask: bool (...), the rows that count.
        """
        params = self.params
        return generalized_jsd(
            student_logits,
            teacher_logits,
            beta=params.beta,
            top_k=fit_top_k(params.top_k, student_logits.shape[-1]),
            clip=params.clip,
            clip_mode=params.clip_mode,
            temperature=params.temperature,
            mask=mask,
            reduction="none",
            chunk_size=params.chunk_size,
        )
