"""Greedy evaluation over a task's problems.

Owns: building the contexts of each evaluation mode (``student``: no VT; ``teacher``: with the
VT; ``noise``: with an N(0, 1) VT), batched greedy decoding through the Backend interface,
scoring with the task, and the accuracy / tokens / latency figures.
Does not know: training; any model family's internals.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from opsd_core.contexts.noise import with_noise_visual_thought
from opsd_core.interfaces import Backend, Task
from opsd_core.sampling import BatchedSampler
from opsd_core.types import Context, Problem

MODES = ("student", "teacher", "noise")


@dataclass
class EvalResult:
    """Figures of one mode.

    Attributes:
        mode: ``student``, ``teacher`` or ``noise``.
        accuracy: fraction of problems scored correct.
        count: problems evaluated.
        tokens_per_sample: mean completion tokens generated.
        seconds_per_sample: wall time of decoding and scoring, per problem.
        records: per problem ``{"id", "response", "correct"}``.
        aggregates: the task's own figures (:meth:`~opsd_core.interfaces.Task.aggregate`),
            ``accuracy`` included.
    """

    mode: str
    accuracy: float
    count: int
    tokens_per_sample: float
    seconds_per_sample: float
    records: list[dict] = field(default_factory=list, repr=False)
    aggregates: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int | str]:
        return {
            **self.aggregates,
            "mode": self.mode,
            "accuracy": self.accuracy,
            "count": self.count,
            "tokens_per_sample": self.tokens_per_sample,
            "seconds_per_sample": self.seconds_per_sample,
        }


def contexts_for(
    mode: str, backend: Backend, problems: Sequence[Problem], generator: torch.Generator | None = None
) -> list[Context]:
    """The contexts of ``mode`` for ``problems`` (VTs must be stored on the problems)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    builder = backend.context_builder()
    if mode == "student":
        return [builder.student_context(problem) for problem in problems]
    contexts = [builder.build(problem).teacher for problem in problems]
    if mode == "noise":
        contexts = [with_noise_visual_thought(context, backend, generator) for context in contexts]
    return contexts


def greedy_decode(
    backend: Backend, model: torch.nn.Module, contexts: Sequence[Context], batch_size: int, max_tokens: int
) -> list[list[int]]:
    """Greedy completions (token lists) of ``contexts``, ``batch_size`` at a time."""
    sampler = BatchedSampler(backend, temperature=0.0, max_completion_tokens=max_tokens, max_image_skips=0)
    completions: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(contexts), batch_size):
            completions.extend(sampler.sample(model, contexts[start : start + batch_size]).token_lists())
    finally:
        model.train(was_training)
    return completions


def evaluate(
    backend: Backend,
    model: torch.nn.Module,
    task: Task,
    problems: Sequence[Problem],
    modes: Sequence[str] = MODES,
    batch_size: int = 64,
    max_tokens: int = 1024,
    seed: int = 0,
) -> dict[str, EvalResult]:
    """Greedy accuracy of ``model`` in each mode over ``problems``."""
    results = {}
    for mode in modes:
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        contexts = contexts_for(mode, backend, problems, generator)
        completions = greedy_decode(backend, model, contexts, batch_size, max_tokens)
        records, scores = [], []
        for problem, tokens in zip(problems, completions):
            response = backend.decode(tokens)
            score = task.score(problem, response)
            scores.append(score)
            records.append({"id": problem.id, "response": response, "correct": score.correct})
        elapsed = time.perf_counter() - started
        count = max(len(problems), 1)
        results[mode] = EvalResult(
            mode=mode,
            accuracy=sum(record["correct"] for record in records) / count,
            count=len(problems),
            tokens_per_sample=sum(len(tokens) for tokens in completions) / count,
            seconds_per_sample=elapsed / count,
            records=records,
            aggregates=task.aggregate(problems, scores),
        )
    return results
