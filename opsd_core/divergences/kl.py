"""The ``kl`` and ``reverse-kl`` divergences behind the Divergence role.

Owns: binding validated :class:`~opsd_core.divergences.params.KlParams` and a direction to
:func:`~opsd_core.divergences.functional.kl_divergence`.
Does not know: the formula (the functional API owns it), reductions over rows and samples
(the trainer owns them), images or backends.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from opsd_core.divergences.functional import fit_top_k, kl_divergence
from opsd_core.divergences.params import KlParams
from opsd_core.interfaces.divergence import Divergence


class _KlDivergence(Divergence):
    direction: ClassVar[Literal["forward", "reverse"]]

    def __init__(self, params: KlParams | None = None):
        self.params = params if params is not None else KlParams()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    def per_token(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 (...) KL of each row, 0 where ``mask`` is False (float64 for float64 inputs).

        Args:
            student_logits: float (..., V); gradients flow into it.
            teacher_logits: float (..., V); never receives gradient.
            mask: bool (...), the rows that count.
        """
        params = self.params
        return kl_divergence(
            student_logits,
            teacher_logits,
            direction=self.direction,
            top_k=fit_top_k(params.top_k, student_logits.shape[-1]),
            temperature=params.temperature,
            mask=mask,
            reduction="none",
            chunk_size=params.chunk_size,
        )


class ForwardKlDivergence(_KlDivergence):
    """Per-token forward KL(p_T || p_S): mass-covering, the usual distillation loss."""

    direction = "forward"


class ReverseKlDivergence(_KlDivergence):
    """Per-token reverse KL(p_S || p_T): mode-seeking, the on-policy RL-style loss."""

    direction = "reverse"
