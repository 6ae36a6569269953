"""The shuffled-VT control: each problem's teacher sees the visual thought of another problem.

Owns: the derangement of a step's problems (no problem keeps its own VT), seeded by the run
seed and the optimizer step only, so every process computes the same one and a resumed run
draws the same as an uninterrupted one; and which donor each of a rank's problems gets.
Does not know: images, contexts or models; the trainer builds the teacher contexts from the
donors' visual thoughts.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def derangement(size: int, seed: int, step: int) -> list[int]:
    """A permutation ``p`` of ``range(size)`` with ``p[i] != i`` for every i (Sattolo's shuffle:
    a uniformly drawn single cycle), a function of ``(seed, step)`` alone.

    Raises:
        ValueError: ``size < 2``: one problem has no other to borrow from.
    """
    if size < 2:
        raise ValueError(f"a derangement needs at least 2 items (got {size})")
    draw = random.Random(f"opsd-shuffled-vt:{seed}:{step}")
    order = list(range(size))
    for last in range(size - 1, 0, -1):
        other = draw.randrange(last)  # strictly below last: what makes it one cycle
        order[last], order[other] = order[other], order[last]
    return order


def donors(step_problems: Sequence[T], seed: int, step: int) -> list[T]:
    """``step_problems[p[i]]`` for each i: the problem whose visual thought problem i's teacher
    sees, with ``p = derangement(len(step_problems), seed, step)``. ``step_problems`` is the
    whole step's problems in stream order, over all micro-batches and all processes; each rank
    then takes the share that matches its own problems."""
    order = derangement(len(step_problems), seed, step)
    return [step_problems[index] for index in order]
