"""The PrivilegedContextBuilder role: student and teacher contexts of a problem.

Owns: which segments each context holds and their texts (system prompt, ref_intro,
transition).
Does not know: models' weights, tokenizers, or how segments are rendered into tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from opsd_core.types import (
    PROBLEM_IMAGE,
    QUESTION,
    REF_INTRO,
    SYSTEM,
    TRANSITION,
    VISUAL_THOUGHT,
    Context,
    ContextPair,
    Image,
    ImageSegment,
    Problem,
    TextSegment,
)


# The paper's teacher texts (Appendix E), for natural-language backends. The paper prints each
# inside typographic quotes on one line; the quotes are not part of the prompt, and no newline
# is added (each text is its own segment, separated by the backend's turn markers).
PAPER_REF_INTRO = (
    "The following images are privileged visual references that depict the intermediate visual thoughts on the "
    "path to the correct answer. Use them silently as grounding context; do not describe or echo them."
)
"""Teacher context only: placed right before the privileged visual-thought image(s)."""

PAPER_TRANSITION = "Now, using your own independent reasoning, answer the problem above. Think step by step."
"""Teacher context only: placed after the visual thought(s), right before the scored completion."""


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


class PaperContextBuilder(PrivilegedContextBuilder):
    """The paper's layout.

    student = [system, problem image, question];
    teacher = student + [ref_intro, visual thought, transition].
    """

    def __init__(self, system_prompt: str, ref_intro: str, transition: str):
        self.system_prompt = system_prompt
        self.ref_intro = ref_intro
        self.transition = transition

    def student_context(self, problem: Problem) -> Context:
        return Context(
            (
                TextSegment(SYSTEM, self.system_prompt),
                ImageSegment(PROBLEM_IMAGE, problem.image),
                TextSegment(QUESTION, problem.question),
            )
        )

    def teacher_context(self, problem: Problem, visual_thought: Image) -> Context:
        return Context(
            self.student_context(problem).segments
            + (
                TextSegment(REF_INTRO, self.ref_intro),
                ImageSegment(VISUAL_THOUGHT, visual_thought),
                TextSegment(TRANSITION, self.transition),
            )
        )
