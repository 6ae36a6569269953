"""The KL diagnostic of the paper's Eq. 4 and the gap closure of Eq. 9.

Owns: sampling on-policy completions from the student in the student context, scoring the
*same* completion rows in the teacher context and the student context (position-aligned, one
row per completion token plus the EOS row; the paper's code compared misaligned rows), and
averaging KL(p_teacher || p_student) over those rows.
Does not know: training, or any model family's internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_core.divergences import kl_divergence
from opsd_core.evaluation.evaluate import contexts_for
from opsd_core.interfaces import Backend
from opsd_core.sampling import BatchedSampler
from opsd_core.types import Problem


@torch.no_grad()
def kl_gap(
    backend: Backend,
    sampling_model: torch.nn.Module,
    teacher_model: torch.nn.Module,
    student_model: torch.nn.Module,
    problems: Sequence[Problem],
    *,
    noise: bool = False,
    batch_size: int = 64,
    max_tokens: int = 1024,
    temperature: float = 1.0,
    seed: int = 0,
) -> float:
    """Mean KL(teacher_model in the teacher context || student_model in the student context)
    in nats per completion row, over completions sampled from ``sampling_model`` in the student
    context. With ``noise`` the teacher context's VT is N(0, 1) noise."""
    generator = torch.Generator().manual_seed(seed)
    sampler = BatchedSampler(backend, temperature=temperature, max_completion_tokens=max_tokens)
    total, rows = 0.0, 0
    models = (sampling_model, teacher_model, student_model)
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            students = contexts_for("student", backend, batch)
            teachers = contexts_for("noise" if noise else "teacher", backend, batch, generator)
            completions = sampler.sample(sampling_model, students, generator)
            teacher_rows = backend.completion_logits(teacher_model, teachers, completions)
            student_rows = backend.completion_logits(student_model, students, completions)
            per_row = kl_divergence(
                student_rows.logits, teacher_rows.logits, direction="forward", mask=student_rows.mask, reduction="none"
            )
            total += float(per_row.sum())
            rows += int(student_rows.mask.sum())
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return total / max(rows, 1)


def gap_closure(kl_before: float, kl_after: float) -> float:
    """Eq. 9: the fraction of the KL gap to the frozen start teacher that training closed."""
    if kl_before <= 0:
        return float("nan")
    return 1.0 - kl_after / kl_before
