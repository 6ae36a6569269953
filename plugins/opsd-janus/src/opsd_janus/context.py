"""Janus-Pro's prompt texts and chat format, and the paper's context builder with them.

Owns: the system prompt, the teacher's two framing texts (paper Appendix E), the strings of
Janus's chat markers and image tokens, and how one context is laid out as a Janus-Pro
conversation: ``<bos>{system}\\n\\n<|User|>: {segments, one per line}\\n\\n<|Assistant|>:``,
each image ``<begin_of_image>`` + image_tokens x ``<image_placeholder>`` + ``<end_of_image>``
(what ``JanusProcessor`` expands one placeholder into). The completion follows the
``<|Assistant|>:`` opener and ends with ``<｜end▁of▁sentence｜>``.
Does not know: token ids, pixels or models.
"""

from __future__ import annotations

from opsd_core.api import PAPER_REF_INTRO, PAPER_TRANSITION, PaperContextBuilder

# Janus-Pro's tokenizer strings (the debug tokenizer reuses them).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image_placeholder>"
IMAGE_START = "<begin_of_image>"
IMAGE_END = "<end_of_image>"
USER = "<|User|>"
ASSISTANT = "<|Assistant|>"

TURN_SEPARATOR = "\n\n"
USER_OPEN = f"{USER}: "
ASSISTANT_OPEN = f"{TURN_SEPARATOR}{ASSISTANT}:"
"""Closes the user turn and opens the answer: the completion-opening text."""

# JanusProcessor's default system prompt (``use_default_system_prompt``).
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)

# Paper Appendix E, verbatim (the same texts every backend's teacher context uses).
REF_INTRO = PAPER_REF_INTRO
TRANSITION = PAPER_TRANSITION


def context_builder(system_prompt: str = SYSTEM_PROMPT) -> PaperContextBuilder:
    """The paper's layout with Janus-Pro's system prompt.

    student = [system, problem image, question];
    teacher = student + [REF_INTRO, visual thought, TRANSITION].
    """
    return PaperContextBuilder(system_prompt=system_prompt, ref_intro=REF_INTRO, transition=TRANSITION)
