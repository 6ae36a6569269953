"""The Task role: a source of problems and a scorer.

Owns: problems (image, question, optional reference answer, optional text-only reasoning trace
for the SFT control, optional stored VT), the order in which training problems stream, scoring
a response text, the task-level figures computed from all scores (a benchmark's circular
groups, pairs, per-file or per-split accuracies), and optionally the class of a completion
token's text (the per-token KL analysis groups by it).
Evaluation-only tasks (benchmarks) have no training problems and say so in :attr:`Task.trains`.
Does not know: models, tokenizers or contexts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

from opsd_core.errors import CapabilityError
from opsd_core.types import Problem, Score


class Task(ABC):
    """Problems to train and evaluate on.

    Attributes:
        trains: whether the task has training problems; an evaluation-only task (a benchmark)
            sets it to False, and a training run that names it is refused when its components
            are built.
    """

    trains: ClassVar[bool] = True

    def train_problems(self, seed: int, start: int = 0) -> Iterator[Problem]:
        """Training problems in a fixed order for ``seed``, beginning at position ``start``.

        The stream may be endless. Resuming a run calls this again with the saved position,
        so the order must depend only on ``seed`` and ``start``. Tasks that train implement it.
        """
        raise CapabilityError(f"task {type(self).__name__} is evaluation-only: it has no training problems")

    @abstractmethod
    def eval_problems(self, limit: int | None = None) -> Sequence[Problem]:
        """The fixed evaluation problems (the first ``limit`` of them if given)."""

    @abstractmethod
    def score(self, problem: Problem, response: str) -> Score:
        """Score the model's full response text to ``problem``."""

    def aggregate(self, problems: Sequence[Problem], scores: Sequence[Score]) -> dict[str, float]:
        """Task-level figures from every problem's score, in the same order.

        The default is the fraction scored correct, ``{"accuracy": ...}``. A task whose figure
        is not a mean of per-item hits overrides it and may add keys: a question counted right
        only if all its circular copies are, pairs right together, accuracy per file or split.
        """
        return {"accuracy": sum(score.correct for score in scores) / max(len(scores), 1)}

    def token_class(self, token: str) -> str | None:
        """The class of one completion token, given as its decoded text (e.g. ``"move"`` or
        ``"cell"``), for the per-token KL analysis (``opsd diagnose --per-token``); None when
        the token belongs to no class. The default defines no classes, and the analysis then
        has no by-class table. The text is what the backend decodes the single token to, so a
        task over subword tokenizers sees pieces of words."""
        return None
