"""The prompt texts of the tiny UMM's contexts, in its small vocabulary.

Owns: the texts of the paper's segments at toy scale (system, question, ref_intro,
transition); the layout itself is the core's PaperContextBuilder.
"""

from opsd_core.interfaces import PaperContextBuilder

SYSTEM = "navigate the frozen lake"
QUESTION = "find path S to G ?"
REF_INTRO = "reference sketch :"
TRANSITION = "now answer :"


def context_builder() -> PaperContextBuilder:
    return PaperContextBuilder(system_prompt=SYSTEM, ref_intro=REF_INTRO, transition=TRANSITION)
