"""The ``jsd`` divergence: the generalized JSD_beta of the paper behind the Divergence role.

Owns: binding validated :class:`~opsd_core.divergences.params.JsdParams` to
:func:`~opsd_core.divergences.functional.generalized_jsd` over logits, and (``fused``) to
:func:`~opsd_core.divergences.fused.fused_topk_jsd` over final hidden states.
Does not know: the formula (the functional API owns it), reductions over rows and samples
(the trainer owns them), images or backends.
"""

from __future__ import annotations

import torch

from opsd_core.divergences.functional import fit_top_k, generalized_jsd, kl_divergence
from opsd_core.divergences.fused import top_k_logits
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

    @property
    def uses_hidden_states(self) -> bool:
        """``fused = true``: the trainer calls :meth:`per_token_hidden` instead of :meth:`per_token`."""
        return self.params.fused

    def per_token_hidden(
        self,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        *,
        with_kl: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """float32 (B, T) loss of each row from final hidden states, 0 where ``mask`` is False.

        Equal to ``per_token(student_hidden @ weight.T, teacher_hidden @ teacher_weight.T,
        mask)`` without the student's (B, T, V) logits (see
        :func:`~opsd_core.divergences.fused.fused_topk_jsd`); a top-K of the vocabulary size or
        more uses every entry as the support.

        Args:
            student_hidden: float (B, T, D); gradients flow into it.
            teacher_hidden: float (B, T, D); never receives gradient.
            weight: float (V, D) the student's lm_head weight; gradients flow into it.
            mask: bool (B, T), the rows that count.
            teacher_weight: float (V, D) the teacher's lm_head weight; None uses ``weight``.
            with_kl: also return the detached float32 (B, T) forward KL(p_T || p_S) of each
                row at temperature 1 over the same top-K support, both distributions
                renormalised on it (0 where ``mask`` is False): a diagnostic that reuses the
                loss's (B, T, K) logits instead of a second pass over the vocabulary.

        Returns:
            The losses, or ``(losses, kl)`` with ``with_kl``.
        """
        params = self.params
        vocab = weight.shape[0]
        top_k = fit_top_k(params.top_k, vocab) or vocab
        student, teacher, keep = top_k_logits(
            student_hidden,
            teacher_hidden,
            weight,
            top_k=top_k,
            mask=mask,
            teacher_weight=teacher_weight,
            chunk_size=params.chunk_size,
        )  # (N', K), (N', K), (N',)
        kept = generalized_jsd(
            student,
            teacher,
            beta=params.beta,
            clip=params.clip,
            clip_mode=params.clip_mode,
            temperature=params.temperature,
            reduction="none",
        )  # (N',)
        batch_shape, rows = student_hidden.shape[:-1], student_hidden.shape[:-1].numel()
        losses = kept.new_zeros(rows).index_copy(0, keep, kept).reshape(batch_shape)  # (B, T)
        if not with_kl:
            return losses
        with torch.no_grad():
            kl = kl_divergence(student.detach(), teacher, reduction="none")  # (N',)
            kl = kl.new_zeros(rows).index_copy(0, keep, kl).reshape(batch_shape)  # (B, T)
        return losses, kl
