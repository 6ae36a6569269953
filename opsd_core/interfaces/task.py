"""The Task role: a source of problems and a scorer.

Owns: problems (image, question, optional reference answer, optional stored VT), the order in
which training problems stream, and scoring a response text.
Does not know: models, tokenizers or contexts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

from opsd_core.types import Problem, Score


class Task(ABC):
    """Problems to train and evaluate on."""

    @abstractmethod
    def train_problems(self, seed: int, start: int = 0) -> Iterator[Problem]:
        """Training problems in a fixed order for ``seed``, beginning at position ``start``.

        The stream may be endless. Resuming a run calls this again with the saved position,
        so the order must depend only on ``seed`` and ``start``.
        """

    @abstractmethod
    def eval_problems(self, limit: int | None = None) -> Sequence[Problem]:
        """The fixed evaluation problems (the first ``limit`` of them if given)."""

    @abstractmethod
    def score(self, problem: Problem, response: str) -> Score:
        """Score the model's full response text to ``problem``."""
