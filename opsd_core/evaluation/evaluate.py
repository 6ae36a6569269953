"""Greedy evaluation over a task's problems.

Owns: building each evaluation context (``student``: no VT; ``teacher``: with the
VT; ``noise``: with an N(0, 1) VT), batched greedy decoding through the Backend interface,
scoring with the task, the accuracy / tokens / latency figures, and the batch-1 answer time in
the text and the visual-thought context (:func:`answer_latency`).
Does not know: training; any model family's internals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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


def _timed(answer: Callable[[Problem], tuple[list[int], int]], problem: Problem) -> tuple[float, int, int]:
    """(seconds, tokens, images drawn) of ``answer(problem)``, which returns the answer's tokens
    as a list (so the device has finished) and the images it drew."""
    started = time.perf_counter()
    tokens, images = answer(problem)
    return time.perf_counter() - started, len(tokens), images


def visual_thought_source(backend: Backend) -> str:
    """How :func:`answer_latency` answers in the VT context: ``interleaved`` (the family's own
    inference draws VTs mid-answer), ``drawn`` (the model draws the VT, then answers after it)
    or ``stored`` (the task's stored VT; the backend cannot draw)."""
    if backend.capabilities.interleaved_answers:
        return "interleaved"
    return "drawn" if backend.capabilities.visual_thoughts else "stored"


@torch.no_grad()
def answer_latency(
    backend: Backend,
    model: torch.nn.Module,
    problems: Sequence[Problem],
    sampler: OnPolicySampler,
    max_tokens: int,
    seed: int = 0,
) -> dict[str, float | int | str | None]:
    """Batch-1 greedy answer time, one problem at a time, in the text context (the student
    context) and in the VT context (see :func:`visual_thought_source`; ``max_tokens`` caps the
    interleaved answer), after one untimed answer in each to warm up; the two contexts take
    turns, problem by problem. Returns ``problems``, ``vt_source``, and per answer the means
    ``text_s``, ``vt_s`` (seconds, drawing included), ``text_tokens``, ``vt_tokens`` and
    ``vt_images`` (images drawn); the figures are None without problems, and the VT ones where
    the backend cannot draw and a problem has no stored VT."""
    source = visual_thought_source(backend)
    builder = backend.context_builder()
    generator = torch.Generator().manual_seed(seed)

    def text(problem: Problem) -> tuple[list[int], int]:
        return sampler.sample(model, [builder.student_context(problem)]).token_lists()[0], 0

    def with_visual_thought(problem: Problem) -> tuple[list[int], int]:
        if source == "interleaved":
            [(tokens, images)] = backend.answer_with_visual_thoughts(
                model, [builder.student_context(problem)], [problem], max_tokens, generator
            )
            return tokens, images
        if source == "drawn":
            [drawn] = backend.generate_visual_thought(model, [problem], generator)
            context = builder.teacher_context(problem, drawn)
        else:
            context = builder.teacher_context(problem, problem.visual_thought)
        return sampler.sample(model, [context]).token_lists()[0], int(source == "drawn")

    answers = {"text": text}
    if source != "stored" or all(problem.visual_thought is not None for problem in problems):
        answers["vt"] = with_visual_thought
    figures: dict[str, float | int | str | None] = {"problems": len(problems), "vt_source": source}
    figures |= dict.fromkeys(("text_s", "text_tokens", "vt_s", "vt_tokens", "vt_images"))
    if not problems:
        return figures
    was_training = model.training
    model.eval()
    try:
        for answer in answers.values():
            answer(problems[0])  # warm-up: first-call costs are not latency
        timings: dict[str, list[tuple[float, int, int]]] = {mode: [] for mode in answers}
        for problem in problems:  # the contexts take turns, so a drift in the machine's load hits both alike
            for mode, answer in answers.items():
                timings[mode].append(_timed(answer, problem))
    finally:
        model.train(was_training)
    for mode, timed in timings.items():
        figures[f"{mode}_s"] = sum(seconds for seconds, _, _ in timed) / len(timed)
        figures[f"{mode}_tokens"] = sum(tokens for _, tokens, _ in timed) / len(timed)
    if "vt" in timings:
        figures["vt_images"] = sum(images for _, _, images in timings["vt"]) / len(timings["vt"])
    return figures
