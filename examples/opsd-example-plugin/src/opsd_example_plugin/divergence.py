"""The total-variation distance per row: TV(p_T, p_S) = 1/2 * sum_i |p_T,i - p_S,i|.

Owns: one divergence, bounded in [0, 1] and symmetric, over the teacher's top-K support
(both distributions renormalised over it) or the whole vocabulary.
Does not know: images, backends or reductions; it sees logits and a mask, nothing else.
"""

import torch

from opsd_core.api import Divergence
from opsd_example_plugin.config import TotalVariationParams


class TotalVariation(Divergence):
    """``total-variation``: zero exactly when the (renormalised) distributions agree."""

    def __init__(self, params: TotalVariationParams | None = None):
        self.params = params if params is not None else TotalVariationParams()

    def per_token(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 (...) distance of each row, 0 where ``mask`` is False (float64 for float64 inputs).

        Args:
            student_logits: float (..., V); gradients flow into it.
            teacher_logits: float (..., V); detached here, never receives gradient.
            mask: bool (...), the rows that count.
        """
        teacher_logits = teacher_logits.detach()
        compute = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else torch.float32
        top_k = self.params.top_k
        if top_k is not None and top_k < student_logits.shape[-1]:
            support = teacher_logits.topk(top_k, dim=-1).indices  # (..., K)
            student_logits = student_logits.gather(-1, support)  # (..., K)
            teacher_logits = teacher_logits.gather(-1, support)  # (..., K)
        if mask is not None:
            # Masked rows are replaced before the softmax, so whatever they held never reaches
            # the result or the gradient.
            keep = mask.unsqueeze(-1)
            student_logits = torch.where(keep, student_logits, 0.0)
            teacher_logits = torch.where(keep, teacher_logits, 0.0)
        p_student = torch.softmax(student_logits.to(compute), dim=-1)
        p_teacher = torch.softmax(teacher_logits.to(compute), dim=-1)
        return 0.5 * (p_teacher - p_student).abs().sum(dim=-1)
