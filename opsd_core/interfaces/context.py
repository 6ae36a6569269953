"""The PrivilegedContextBuilder role: student and teacher contexts of a problem.

Owns: the interface: a student context, a teacher context that adds the visual thought, and
both together.
Does not know: models' weights, tokenizers, or how segments are rendered into tokens. The
paper's layout and the noise control that modifies it live in :mod:`opsd_core.contexts`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from opsd_core.types import Context, ContextPair, Image, Problem


class PrivilegedContextBuilder(ABC):
    """Builds the student context and the VT-privileged teacher context."""

    @abstractmethod
    def student_context(self, problem: Problem) -> Context:
        """The context the student answers from (no visual thought)."""

    @abstractmethod
    def teacher_context(self, problem: Problem, visual_thought: Image) -> Context:
        """The privileged context: the student's plus the visual thought."""

    def build(self, problem: Problem, visual_thought: Image | None = None) -> ContextPair:
        """Both contexts; ``visual_thought`` defaults to the problem's stored VT."""
        thought = problem.visual_thought if visual_thought is None else visual_thought
        if thought is None:
            raise ValueError(f"problem {problem.id!r} has no visual thought; generate one first")
        return ContextPair(self.student_context(problem), self.teacher_context(problem, thought))
