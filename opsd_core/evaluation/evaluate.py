"""Greedy evaluation over a task's problems.

Owns: building each evaluation context (``student``: no VT; ``teacher``: with the
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
from opsd_core.interfaces import Backend, OnPolicySampler, Task
from opsd_core.sampling import BatchedSampler
from opsd_core.types import Context, Problem

CONTEXTS = ("student", "teacher", "noise")


@dataclass
class EvalResult:
    """Figures of one evaluation context.

    Attributes:
        context: ``student``, ``teacher`` or ``noise``.
        accuracy: fraction of problems scored correct.
        count: problems evaluated.
        tokens_per_sample: mean completion tokens generated.
        seconds_per_sample: wall time of decoding and scoring, per problem.
        records: per problem ``{"id", "response", "correct"}``.
        aggregates: the task's own figures (:meth:`~opsd_core.interfaces.Task.aggregate`),
            ``accuracy`` included.
    """

    context: str
    accuracy: float
    count: int
    tokens_per_sample: float
    seconds_per_sample: float
    records: list[dict] = field(default_factory=list, repr=False)
    aggregates: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int | str]:
        return {
            **self.aggregates,
            "context": self.context,
            "accuracy": self.accuracy,
            "count": self.count,
            "tokens_per_sample": self.tokens_per_sample,
            "seconds_per_sample": self.seconds_per_sample,
        }


def contexts_for(
    context: str, backend: Backend, problems: Sequence[Problem], generator: torch.Generator | None = None
) -> list[Context]:
    """The contexts named ``context`` for ``problems`` (VTs must be stored on the problems)."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    builder = backend.context_builder()
    if context == "student":
        return [builder.student_context(problem) for problem in problems]
    contexts = [builder.build(problem).teacher for problem in problems]
    if context == "noise":
        contexts = [with_noise_visual_thought(built, backend, generator) for built in contexts]
    return contexts


def greedy_sampler(backend: Backend, max_tokens: int) -> OnPolicySampler:
    """The built-in sampler, greedy, up to ``max_tokens`` tokens, no image skips (a run passes
    its own ``[sampler]`` kind instead: ``Components.sampler_with``)."""
    return BatchedSampler(backend, temperature=0.0, max_completion_tokens=max_tokens, max_image_skips=0)


def greedy_decode(
    sampler: OnPolicySampler, model: torch.nn.Module, contexts: Sequence[Context], batch_size: int
) -> list[list[int]]:
    """Completions (token lists) of ``contexts`` by a greedy ``sampler``, ``batch_size`` at a time."""
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
    contexts: Sequence[str] = CONTEXTS,
    batch_size: int = 64,
    max_tokens: int = 1024,
    seed: int = 0,
    sampler: OnPolicySampler | None = None,
) -> dict[str, EvalResult]:
    """Greedy accuracy of ``model`` in each named context over ``problems``, decoded by
    ``sampler`` (greedy; default :func:`greedy_sampler` with ``max_tokens``)."""
    sampler = sampler or greedy_sampler(backend, max_tokens)
    results = {}
    for name in contexts:
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        completions = greedy_decode(sampler, model, contexts_for(name, backend, problems, generator), batch_size)
        records, scores = [], []
        for problem, tokens in zip(problems, completions):
            response = backend.decode(tokens)
            score = task.score(problem, response)
            scores.append(score)
            records.append({"id": problem.id, "response": response, "correct": score.correct})
        elapsed = time.perf_counter() - started
        count = max(len(problems), 1)
        results[name] = EvalResult(
            context=name,
            accuracy=sum(record["correct"] for record in records) / count,
            count=len(problems),
            tokens_per_sample=sum(len(tokens) for tokens in completions) / count,
            seconds_per_sample=elapsed / count,
            records=records,
            aggregates=task.aggregate(problems, scores),
        )
    return results
