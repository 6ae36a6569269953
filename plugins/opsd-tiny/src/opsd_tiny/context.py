"""The prompt texts of the tiny UMM's contexts, in its word vocabulary.

Owns: the texts of the paper's segments at toy scale (system, question, ref_intro,
transition).
Does not know: the layout (the core's ``PaperContextBuilder``: student = system, problem
image, question; teacher adds ref_intro, visual thought, transition) or how segments become
tokens (the backend).
"""

from opsd_core.api import PaperContextBuilder

SYSTEM = "navigate the frozen lake"
QUESTION = "find path S to G ?"
REF_INTRO = "reference sketch :"
TRANSITION = "now answer :"


def context_builder() -> PaperContextBuilder:
    """The paper's student/teacher layout with the tiny prompt texts."""
    return PaperContextBuilder(system_prompt=SYSTEM, ref_intro=REF_INTRO, transition=TRANSITION)
