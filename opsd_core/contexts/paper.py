"""The paper's student and teacher contexts (the built-in ``paper`` context builder).

Owns: the layout student = [system, problem image, question], teacher = student + [ref_intro,
visual thought, transition], the paper's teacher texts (Appendix E), and building the
``[context]`` section's builder from a backend's own prompt texts with optional overrides.
Does not know: models' weights, tokenizers, or how segments are rendered into tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from opsd_core.contexts.params import PaperContextParams
from opsd_core.errors import ConfigError
from opsd_core.interfaces.context import PrivilegedContextBuilder
from opsd_core.types import (
    PROBLEM_IMAGE,
    QUESTION,
    REF_INTRO,
    SYSTEM,
    TRANSITION,
    VISUAL_THOUGHT,
    Context,
    Image,
    ImageSegment,
    Problem,
    TextSegment,
)

if TYPE_CHECKING:
    from opsd_core.interfaces.backend import Backend

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


def paper_context(params: PaperContextParams, backend: Backend) -> PrivilegedContextBuilder:
    """The ``[context]`` builder named ``paper``: the backend's own builder, with the texts
    that ``params`` sets in place of the backend's.

    Raises:
        ConfigError: a text is overridden but the backend's builder does not use the paper's
            layout (it has no such text to replace).
    """
    builder = backend.context_builder()
    overrides = {key: value for key, value in params.model_dump(exclude={"name"}).items() if value is not None}
    if not overrides:
        return builder
    if not isinstance(builder, PaperContextBuilder):
        raise ConfigError(
            f"context.{next(iter(overrides))}: backend {type(backend).__name__} builds its contexts with "
            f"{type(builder).__name__}, not the paper's layout, so its texts cannot be replaced; remove the override"
        )
    texts = {"system_prompt": builder.system_prompt, "ref_intro": builder.ref_intro, "transition": builder.transition}
    return PaperContextBuilder(**(texts | overrides))
