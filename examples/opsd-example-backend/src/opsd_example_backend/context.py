"""The prompt texts of ``byte-umm``'s contexts.

Owns: the system prompt; the teacher-only texts are the paper's (``PAPER_REF_INTRO`` and
``PAPER_TRANSITION``), which a byte-level model can read as they are.
Does not know: the layout (the core's ``PaperContextBuilder``: student = system, problem
image, question; teacher adds ref_intro, visual thought, transition) or how segments become
tokens (the backend).
"""

from opsd_core.api import PAPER_REF_INTRO, PAPER_TRANSITION, PaperContextBuilder

SYSTEM_PROMPT = "You solve visual puzzles. Answer with the moves only."


def context_builder() -> PaperContextBuilder:
    """The paper's student/teacher layout with ``byte-umm``'s system prompt."""
    return PaperContextBuilder(system_prompt=SYSTEM_PROMPT, ref_intro=PAPER_REF_INTRO, transition=PAPER_TRANSITION)
