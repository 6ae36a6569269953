"""Emu3's contexts: the paper's prompt texts and Emu3's chat layout.

Owns: the texts of the paper's segments (system prompt, ref_intro and transition of Appendix
E), the context builder putting them in the paper's layout, and the layout Emu3-Chat was
trained on (``<bos>{system} USER: {user turn} ASSISTANT:``), written down as pieces: a
context becomes a list of text pieces and image slots in order, so the backend can tokenise
the texts and splice each image's token block in place. The teacher's extra segments stay in
the user turn, in order: Emu3's own chat template would put every image before every text.
Does not know: tokens, VQ codes or weights.
"""

from __future__ import annotations

from opsd_core.api import (
    PAPER_REF_INTRO,
    PAPER_TRANSITION,
    SYSTEM,
    Context,
    ImageSegment,
    PaperContextBuilder,
    TextSegment,
)

SYSTEM_PROMPT = (
    "You are a helpful assistant. Think step by step, then give the final answer wrapped in "
    "<answer></answer> tags."
)
# Paper Appendix E, verbatim.
REF_INTRO = PAPER_REF_INTRO
TRANSITION = PAPER_TRANSITION

USER_OPENING = "USER: "
ASSISTANT_OPENING = "ASSISTANT:"


def context_builder(system_prompt: str = SYSTEM_PROMPT) -> PaperContextBuilder:
    """student = [system, problem image, question]; teacher adds [ref_intro, visual thought, transition]."""
    return PaperContextBuilder(system_prompt=system_prompt, ref_intro=REF_INTRO, transition=TRANSITION)


def layout(context: Context) -> list[str | ImageSegment]:
    """``context`` as Emu3-Chat's turns, ending with the completion-opening ``ASSISTANT:``.

    Returns texts and image segments in order (BOS not included). A leading ``system`` segment
    is the system text; every other segment belongs to the user turn, texts followed by a space
    as Emu3's chat template writes them.
    """
    pieces: list[str | ImageSegment] = []
    segments = list(context.segments)
    if segments and segments[0].name == SYSTEM and isinstance(segments[0], TextSegment):
        pieces.append(segments.pop(0).text + " ")
    pieces.append(USER_OPENING)
    for segment in segments:
        if isinstance(segment, TextSegment):
            pieces.append(segment.text + " ")
        elif isinstance(segment, ImageSegment):
            pieces.append(segment)
        else:
            raise TypeError(f"emu3 cannot render a segment of type {type(segment).__name__}")
    pieces.append(ASSISTANT_OPENING)
    return pieces
