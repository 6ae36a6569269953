"""The Logger role: where a run's scalars, config and media go (a file, TensorBoard, W&B, ...).

Owns: what a logger is handed: the resolved config once, each logged optimizer step's scalars,
each phase's evaluation results, and media (sampled completions with their visual thought and
per-token teacher-student KL, already rendered as one HTML page); and ``close``.
Does not know: how any of it was computed, or which process it runs in (only rank 0 logs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from opsd_core.types import Image


@dataclass(frozen=True)
class MediaSample:
    """One problem's completion as a media record.

    Attributes:
        problem_id: the task's id of the problem.
        tokens: the completion, one decoded string per token (the EOS included when emitted).
        token_kl: KL(teacher in the teacher context || student in the student context) at each
            token of ``tokens``, nats; same length as ``tokens``.
        visual_thought: the image the teacher context showed (PIL, or float32 (3, H, W) in [0, 1]).
        correct: whether the task's scorer accepted the completion.
    """

    problem_id: str
    tokens: tuple[str, ...]
    token_kl: tuple[float, ...]
    visual_thought: Image | None
    correct: bool

    @property
    def completion(self) -> str:
        return "".join(self.tokens)

    @property
    def mean_kl(self) -> float:
        return sum(self.token_kl) / max(len(self.token_kl), 1)


class Logger(ABC):
    """Receives a run's records on rank 0. Built by its registered factory as
    ``factory(run_dir=Path, config=RunConfig)``; ``close`` is always called, also after a crash.

    Attributes:
        packages: the Python distributions the logger imports (checked before a run starts, so
            a missing one is one clear line naming the package and the pip command).
    """

    packages: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved run config (``RunConfig.model_dump(mode="json")``), once per run."""

    @abstractmethod
    def log_scalars(self, phase: str, step: int, scalars: Mapping[str, float]) -> None:
        """One logged optimizer step of ``phase`` (loss, lr, grad norm, KL, throughput, memory, ...)."""

    @abstractmethod
    def log_results(self, phase: str, step: int, results: Mapping[str, float]) -> None:
        """A phase's evaluation after ``step`` optimizer steps (accuracies, KL, gap closure)."""

    @abstractmethod
    def log_media(self, phase: str, step: int, samples: Sequence[MediaSample], html: str) -> None:
        """Completions of ``phase`` at ``step`` with their VTs and per-token KL; ``html`` is the
        page that shows them with tokens coloured by KL."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release; called once, however the run ends."""
