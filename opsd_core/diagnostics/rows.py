"""Completion rows scored in two contexts: what the KL diagnostic, the media records and the
per-token analysis all start from.

Owns: running the teacher model in the teacher contexts and the student model in the student
contexts on the same completion rows, the per-row KL(teacher || student) and, on request, the
student's entropy at each row, and holding models in eval mode while a diagnostic runs.
Does not know: how the completions were drawn, or what the per-row figures are summed into.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from opsd_core.divergences import kl_divergence
from opsd_core.interfaces import Backend
from opsd_core.types import CompletionBatch, Context

# How a page or table shows the row that predicts the end of a completion (row N).
END_OF_COMPLETION = "⏎"


@dataclass(frozen=True)
class RowScores:
    """Per-row figures of B completions.

    Attributes:
        kl: float32 (B, N + 1), KL(p_teacher || p_student) in nats at each row; 0 off the mask.
        mask: bool (B, N + 1), the loss rows (``CompletionBatch.row_mask()``).
        entropy: float32 (B, N + 1), the student's entropy in nats at each row (0 off the
            mask), or None when it was not asked for.
    """

    kl: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor | None = None


@contextmanager
def evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """Hold ``models`` in eval mode, then give each back the mode it had."""
    were_training = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, training in zip(models, were_training):
            model.train(training)


def row_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 (B, N + 1): the entropy in nats of softmax(float (B, N + 1, V) ``logits``) at
    each row, 0 where bool (B, N + 1) ``mask`` is False; one sample at a time, so at most one
    sample's (N + 1, V) float32 copy exists at once."""
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    for sample in range(logits.shape[0]):
        log_p = torch.log_softmax(logits[sample].float(), dim=-1)  # (N + 1, V)
        entropy[sample] = -(log_p.exp() * log_p).sum(dim=-1)
    return entropy * mask


def score_rows(
    backend: Backend,
    teacher_model: torch.nn.Module,
    student_model: torch.nn.Module,
    teachers: Sequence[Context],
    students: Sequence[Context],
    completions: CompletionBatch,
    entropy: bool = False,
) -> RowScores:
    """``completions`` scored by ``teacher_model`` in the ``teachers`` contexts and by
    ``student_model`` in the ``students`` contexts (one of each per completion), row by row;
    with ``entropy``, also the student's entropy at each row."""
    teacher_rows = backend.completion_logits(teacher_model, teachers, completions)
    student_rows = backend.completion_logits(student_model, students, completions)
    kl = kl_divergence(
        student_rows.logits, teacher_rows.logits, direction="forward", mask=student_rows.mask, reduction="none"
    )  # (B, N + 1)
    return RowScores(
        kl=kl,
        mask=student_rows.mask,
        entropy=row_entropy(student_rows.logits, student_rows.mask) if entropy else None,
    )
