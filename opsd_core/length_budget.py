"""Whether a run config's length caps fit a backend's positions, checked before anything runs.

Owns: the shortest student and teacher contexts a backend renders (its own prompt texts and
chat markers, the images at the size the backend budgets for, an empty question: every real
problem's context is at least this long), and the refusals, as ConfigError naming the field,
when a completion cap (sampling's, evaluation's) or the forward cap cannot fit beside them.
Does not know: any model family; the backend passes its position limit, the name of the
setting behind it and the images to budget for. Backends call :func:`check_length_budget`
from ``Backend.check_run``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opsd_core.errors import ConfigError
from opsd_core.interfaces import Backend
from opsd_core.types import Problem


@dataclass(frozen=True)
class ContextFloor:
    """Positions the shortest contexts take, completion-opening tokens included.

    Attributes:
        student: [system, problem image, empty question].
        teacher: the student's plus [ref_intro, visual thought, transition].
    """

    student: int
    teacher: int


def context_floor(backend: Backend, image: Any, visual_thought: Any) -> ContextFloor:
    """The lengths of ``backend``'s contexts for a problem with ``image``, no question text and
    ``visual_thought`` as the teacher's visual thought."""
    pair = backend.context_builder().build(Problem(id="length-budget", image=image, question=""), visual_thought)
    return ContextFloor(student=backend.context_length(pair.student), teacher=backend.context_length(pair.teacher))


def check_length_budget(backend: Backend, config: Any, floor: ContextFloor, positions: int, limit: str, images: str) -> None:
    """Refuse caps of ``config`` that no problem could be run with.

    Args:
        backend: the backend (named in messages by its class).
        config: the run config; reads ``sampling.max_completion_tokens``,
            ``sampling.max_forward_tokens`` and ``eval.max_completion_tokens``.
        floor: the backend's shortest contexts (see :func:`context_floor`).
        positions: the most positions one sequence may take.
        limit: what sets ``positions``, e.g. ``"backend.max_context_tokens"``.
        images: how the floor's images were sized, e.g. ``"images of 576 tokens"``.

    Raises:
        ConfigError: on-policy sampling (student context + ``sampling.max_completion_tokens``),
            evaluation (teacher context + the evaluation cap) or the teacher's forward (its
            context + one completion token + EOS within ``sampling.max_forward_tokens``) cannot
            fit; the message names the field, the positions needed and the largest value that fits.
    """
    name = type(backend).__name__
    basis = f"before any question text, with {images}"
    sampling = config.sampling
    if floor.student + sampling.max_completion_tokens > positions:
        raise ConfigError(
            f"sampling.max_completion_tokens = {sampling.max_completion_tokens} does not fit: the student context takes "
            f"{floor.student} positions {basis}, so sampling needs {floor.student + sampling.max_completion_tokens} but "
            f"{name} allows {positions} ({limit}); set it to at most {max(positions - floor.student, 0)}"
        )
    evaluation = config.eval.max_completion_tokens
    field = "eval.max_completion_tokens" if evaluation is not None else "sampling.max_completion_tokens (the evaluation cap while eval.max_completion_tokens is unset)"
    cap = evaluation if evaluation is not None else sampling.max_completion_tokens
    if floor.teacher + cap > positions:
        raise ConfigError(
            f"{field} = {cap} does not fit: evaluation answers in the teacher context too, which takes {floor.teacher} "
            f"positions {basis}, so it needs {floor.teacher + cap} but {name} allows {positions} ({limit}); set "
            f"eval.max_completion_tokens to at most {max(positions - floor.teacher, 0)}"
        )
    if floor.teacher + 2 > sampling.max_forward_tokens:
        raise ConfigError(
            f"sampling.max_forward_tokens = {sampling.max_forward_tokens} leaves no room for a completion: the teacher "
            f"context alone takes {floor.teacher} positions {basis}; raise it to at least {floor.teacher + 2}"
        )
