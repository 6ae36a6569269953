"""The KL diagnostic of the paper's Eq. 4 and the gap closure of Eq. 9.

Owns: sampling on-policy completions from the student in the student context, scoring the
*same* completion rows in the teacher context and the student context (position-aligned, one
row per completion token plus the EOS row; the paper's code compared misaligned rows), and
averaging KL(p_teacher || p_student) over those rows, and the uncertainty of that average and
of the gap closure: each sample's draws are keyed by its seed and its place in the problem list,
so two models estimated on the same problems with the same seed are paired sample by sample,
and the gap closure's standard error is a paired one over those samples. The draws themselves
(:func:`on_policy_draws`) are what the per-token analysis breaks down.
Does not know: training, or any model family's internals.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from opsd_core.diagnostics.rows import RowScores, evaluating, score_rows
from opsd_core.evaluation.evaluate import contexts_for
from opsd_core.interfaces import Backend, OnPolicySampler
from opsd_core.sampling import BatchedSampler, sample_seed
from opsd_core.types import CompletionBatch, Problem


@dataclass(frozen=True)
class KlEstimate:
    """A KL diagnostic: the mean over completion rows and what it was averaged from.

    Attributes:
        mean: nats per completion row, rows of all samples pooled.
        standard_error: of ``mean``, over samples (a ratio estimator's linearisation).
        per_sample: ``(sum of the sample's row KLs, its rows)`` for each sample, in problem order.
    """

    mean: float
    standard_error: float
    per_sample: list[tuple[float, int]]


def _linearised(per_sample: Sequence[tuple[float, int]]) -> tuple[float, list[float]]:
    """The pooled mean sum(t) / sum(n) and each sample's influence on it, (t_i - mean n_i) / mean(n)."""
    total = sum(t for t, _ in per_sample)
    rows = sum(n for _, n in per_sample)
    mean = total / max(rows, 1)
    average_rows = rows / max(len(per_sample), 1) or 1.0
    return mean, [(t - mean * n) / average_rows for t, n in per_sample]


def _standard_error(influences: Sequence[float]) -> float:
    """NaN for fewer than two samples or a non-finite one (a diverged model's KL is infinite)."""
    if len(influences) < 2 or not all(math.isfinite(value) for value in influences):
        return float("nan")
    return statistics.stdev(influences) / math.sqrt(len(influences))


@torch.no_grad()
def on_policy_draws(
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
    sampler: OnPolicySampler | None = None,
    entropy: bool = False,
) -> Iterator[tuple[CompletionBatch, RowScores]]:
    """The diagnostic's draws, a batch of ``problems`` at a time: completions sampled from
    ``sampling_model`` in the student context, scored by ``teacher_model`` in the teacher context
    and ``student_model`` in the student context (:func:`~opsd_core.diagnostics.rows.score_rows`;
    ``entropy``: with the student's entropy per row). Sample i draws with the seed
    ``sample_seed(seed, i)``, whatever the batch. With ``noise`` the teacher context's VT is
    N(0, 1) noise (drawn from a generator seeded by ``seed``). ``sampler`` (a run's own
    ``[sampler]`` kind) replaces the built-in one of ``temperature`` and ``max_tokens``. The
    models are in eval mode until the last batch has been drawn."""
    generator = torch.Generator().manual_seed(seed)
    sampler = sampler or BatchedSampler(backend, temperature=temperature, max_completion_tokens=max_tokens)
    with evaluating(sampling_model, teacher_model, student_model):
        for start in range(0, len(problems), batch_size):
            batch = problems[start : start + batch_size]
            students = contexts_for("student", backend, batch)
            teachers = contexts_for("noise" if noise else "teacher", backend, batch, generator)
            seeds = [sample_seed(seed, start + index) for index in range(len(batch))]
            completions = sampler.sample(sampling_model, students, seeds=seeds)
            scores = score_rows(backend, teacher_model, student_model, teachers, students, completions, entropy)
            yield completions, scores


def kl_estimate(draws: Iterable[tuple[CompletionBatch, RowScores]]) -> KlEstimate:
    """The mean row KL of ``draws`` (:func:`on_policy_draws`) and its standard error."""
    per_sample: list[tuple[float, int]] = []
    for _, scores in draws:
        sums = scores.kl.double().sum(dim=1).tolist()
        rows = scores.mask.sum(dim=1).tolist()
        per_sample += [(float(total), int(count)) for total, count in zip(sums, rows)]
    mean, influences = _linearised(per_sample)
    return KlEstimate(mean, _standard_error(influences), per_sample)


def kl_gap(
    backend: Backend,
    sampling_model: torch.nn.Module,
    teacher_model: torch.nn.Module,
    student_model: torch.nn.Module,
    problems: Sequence[Problem],
    **draws,
) -> KlEstimate:
    """KL(teacher_model in the teacher context || student_model in the student context) in nats
    per completion row, over completions sampled from ``sampling_model`` in the student context;
    ``draws`` are :func:`on_policy_draws`' keywords (``noise``, ``batch_size``, ``max_tokens``,
    ``temperature``, ``seed``, ``sampler``)."""
    return kl_estimate(on_policy_draws(backend, sampling_model, teacher_model, student_model, problems, **draws))


def gap_closure(kl_before: float, kl_after: float) -> float:
    """Eq. 9: the fraction of the KL gap to the frozen start teacher that training closed."""
    if kl_before <= 0:
        return float("nan")
    return 1.0 - kl_after / kl_before


def gap_closure_standard_error(before: KlEstimate | Sequence, after: KlEstimate | Sequence) -> float:
    """Standard error of :func:`gap_closure` paired over samples: ``before`` and ``after`` are
    estimates (or their ``per_sample`` lists) on the same problems with the same seeds, sample i
    of one matched with sample i of the other (delta method on 1 - A / B)."""
    before = before.per_sample if isinstance(before, KlEstimate) else before
    after = after.per_sample if isinstance(after, KlEstimate) else after
    if len(before) != len(after):
        raise ValueError(f"paired estimates need the same samples (got {len(before)} and {len(after)})")
    kl_before, d_before = _linearised(before)
    kl_after, d_after = _linearised(after)
    if kl_before <= 0:
        return float("nan")
    influences = [-(a / kl_before - kl_after * b / kl_before**2) for a, b in zip(d_after, d_before)]
    return _standard_error(influences)
