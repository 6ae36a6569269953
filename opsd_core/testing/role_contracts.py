"""Contract checks for samplers and context builders, for a plugin's own tests.

Owns: what the trainer relies on from an :class:`~opsd_core.interfaces.OnPolicySampler` (one
completion per context within the cap, a row mask aligned with the tokens, seeded draws that
depend only on each row's seed) and from a
:class:`~opsd_core.interfaces.PrivilegedContextBuilder` (the student context is the teacher's
prefix, the visual thought is the teacher's privilege, the stored visual thought is the
default). Each check raises ``AssertionError`` naming the broken promise.
Does not know: any particular model, sampler or prompt.

Use from a plugin's tests::

    def test_my_sampler(backend, model, contexts):
        check_sampler_contract(MySampler(backend, ...), backend, model, contexts)

    def test_my_context(problem):
        check_context_contract(MyBuilder(...), problem)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_core.interfaces import Backend, OnPolicySampler, PrivilegedContextBuilder
from opsd_core.types import VISUAL_THOUGHT, Context, ImageSegment, Problem


def check_sampler_contract(
    sampler: OnPolicySampler,
    backend: Backend,
    model: torch.nn.Module,
    contexts: Sequence[Context],
    max_completion_tokens: int | None = None,
) -> None:
    """Sample ``contexts`` (at least two) with fixed seeds and check the completions.

    ``max_completion_tokens``: the cap the sampler was built with, when it has one to check.
    """
    assert len(contexts) >= 2, "check_sampler_contract needs at least two contexts"
    seeds = list(range(11, 11 + len(contexts)))
    batch = sampler.sample(model, contexts, seeds=seeds)
    rows, width = batch.tokens.shape
    assert rows == len(contexts), f"{rows} completions for {len(contexts)} contexts"
    lengths = batch.lengths.tolist()
    assert all(0 <= length <= width for length in lengths), f"lengths {lengths} outside 0..{width}"
    if max_completion_tokens is not None:
        assert max(lengths) <= max_completion_tokens, f"lengths {lengths} exceed the cap {max_completion_tokens}"
    pad = backend.vocabulary.pad_id
    for row, length in enumerate(lengths):
        assert bool((batch.tokens[row, length:] == pad).all()), f"row {row} is not padded after its length"
        assert not bool(batch.sampled[row, length:].any()), f"row {row} marks padding as sampled"
    mask = batch.row_mask()
    assert mask.shape == (rows, width + 1), f"row mask {tuple(mask.shape)}, expected {(rows, width + 1)}"
    assert mask.sum(dim=1).tolist() == [int(batch.sampled[r].sum()) + 1 for r in range(rows)], (
        "each completion has a loss row per sampled token plus the EOS row"
    )

    again = sampler.sample(model, contexts, seeds=seeds)
    assert _same(batch, again), "the same seeds drew different completions"
    alone = [sampler.sample(model, [context], seeds=[seed]) for context, seed in zip(contexts, seeds)]
    for row, single in enumerate(alone):
        length = lengths[row]
        assert int(single.lengths[0]) == length and torch.equal(
            single.tokens[0, :length].cpu(), batch.tokens[row, :length].cpu()
        ), f"row {row} sampled alone differs from the batch: a row's draws must depend only on its seed"


def _same(a, b) -> bool:
    return torch.equal(a.lengths.cpu(), b.lengths.cpu()) and torch.equal(a.tokens.cpu(), b.tokens.cpu())


def _same_segments(a: Sequence, b: Sequence) -> bool:
    """Same kinds, names, texts, and the very same image objects (images are not copied)."""
    return len(a) == len(b) and all(
        type(x) is type(y)
        and x.name == y.name
        and (x.image is y.image if isinstance(x, ImageSegment) else x.text == y.text)
        for x, y in zip(a, b)
    )


def check_context_contract(builder: PrivilegedContextBuilder, problem: Problem) -> None:
    """Build both contexts of ``problem`` (which needs a stored visual thought) and check them."""
    assert problem.visual_thought is not None, "check_context_contract needs a problem with a stored visual thought"
    student = builder.student_context(problem)
    teacher = builder.teacher_context(problem, problem.visual_thought)
    count = len(student.segments)
    assert _same_segments(teacher.segments[:count], student.segments), (
        "the student context must be the teacher context's prefix"
    )
    assert VISUAL_THOUGHT not in student.names(), "the student context must not hold the visual thought"
    thoughts = [s for s in teacher.segments if isinstance(s, ImageSegment) and s.name == VISUAL_THOUGHT]
    assert thoughts and thoughts[0].image is problem.visual_thought, "the teacher context must hold the visual thought"
    pair = builder.build(problem)
    assert _same_segments(pair.student.segments, student.segments), "build() must give student_context()"
    assert pair.teacher.names() == teacher.names(), "build() must use the problem's stored visual thought"
    other = torch.zeros_like(torch.as_tensor(problem.visual_thought))
    drawn = builder.build(problem, other).teacher
    assert any(s.name == VISUAL_THOUGHT and s.image is other for s in drawn.segments), (
        "build(problem, visual_thought) must place the given visual thought"
    )
