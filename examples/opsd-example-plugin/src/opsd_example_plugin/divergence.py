"""Total-variation distance per row: 0.5 * sum |p_T - p_S|.

Owns: one divergence; sees logits and a mask, never images or backends.
"""

import torch

from opsd_core.interfaces import Divergence

from opsd_example_plugin.config import TotalVariationParams


class TotalVariation(Divergence):
    """Bounded in [0, 1]; zero exactly when the (renormalised) distributions agree."""

    def __init__(self, params: TotalVariationParams | None = None):
        self.params = params or TotalVariationParams()

    def per_token(self, student_logits, teacher_logits, mask=None):
        """float32 (...) distance per row of float (..., V) logits; 0 where ``mask`` is False."""
        teacher_logits = teacher_logits.detach()
        top_k = self.params.top_k
        if top_k is not None and top_k < student_logits.shape[-1]:
            support = teacher_logits.topk(top_k, dim=-1).indices  # (..., K)
            teacher_logits = teacher_logits.gather(-1, support)
            student_logits = student_logits.gather(-1, support)
        p_student = torch.softmax(student_logits.float(), dim=-1)
        p_teacher = torch.softmax(teacher_logits.float(), dim=-1)
        rows = 0.5 * (p_teacher - p_student).abs().sum(dim=-1)
        if mask is not None:
            rows = torch.where(mask, rows, torch.zeros_like(rows))
        return rows
