"""The Divergence role: a per-token loss between student and teacher distributions.

Owns: the numerics of one divergence over logits rows.
Does not know: images, backends, contexts or how rows were produced; it sees logits and a
mask, nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Divergence(ABC):
    """Per-row divergence; the trainer does the reduction over rows and samples.

    A divergence that computes the loss from final hidden states and the ``lm_head`` weight
    (so the student's (B, T, V) logits never exist) sets :attr:`uses_hidden_states` and
    implements ``per_token_hidden``; the run is then checked once, when its components are
    built, against the backend's declared ``hidden_states`` capability.
    """

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the trainer calls ``per_token_hidden(student_hidden, teacher_hidden, weight,
        mask, teacher_weight=..., with_kl=True)`` instead of :meth:`per_token`."""
        return False

    @abstractmethod
    def per_token(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 (...) divergence of each row, 0 where ``mask`` is False.

        Args:
            student_logits: float (..., V); gradients flow into it.
            teacher_logits: float (..., V); never receives gradient.
            mask: bool (...), the rows that count.
        """
