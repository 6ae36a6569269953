"""The prompt texts of the Visual-OPSD recipe for ThinkMorph, and ThinkMorph's reasoning format.

Owns: the system prompts (training and inference variants), the teacher's two framing texts
(paper Appendix E), the plain-text reasoning markers ThinkMorph emits, the two output texts of
a ThinkMorph training sample, the text-only reasoning trace (the SFT control's target), and the context builder that puts the
texts in the paper's layout.
Does not know: tokens or turn markers (the backend renders every text segment as
``<|im_start|>text<|im_end|>``), images, or where problems come from.
"""

from __future__ import annotations

from opsd_core.api import PAPER_REF_INTRO, PAPER_TRANSITION, PaperContextBuilder

# ThinkMorph's reasoning vocabulary. These are ordinary text (each several BPE tokens), not the
# tokenizer's special ``<|vision_start|>``/``<|vision_end|>`` markers. A turn ending with
# IMAGE_START asks for a visual thought; the turn after the image begins with IMAGE_END.
THINK_START = "<think>"
THINK_END = "</think>"
IMAGE_START = "<image_start>"
IMAGE_END = "<image_end>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"

# The paper does not print this text; it is the training copy of ThinkMorph's "think" prompt
# as the paper's packer holds it (official-repo.md section 3.5): one line, no surrounding
# newlines, a space in "i.e. <answer>". Its "</image_end>" (where the model emits "<image_end>")
# is the wording the model was trained with, so it stays.
SYSTEM_PROMPT = (
    "Let's think step by step to answer the question. For text-based thinking, enclose the process within "
    "<think> </think>, e.g. <think> thinking process here </think>. For visual thinking, enclose the content "
    "within <image_start> </image_end>, e.g. <image_start> thinking image here </image_end>. Finally conclude "
    "with the final answer wrapped in <answer></answer> tags, i.e. <answer> answer here </answer>."
)
"""The system segment of the student and teacher contexts in training, the KL diagnostic and our
evaluation (the first segment of both)."""

# bagel-architecture.md section 7.3: the same sentence wrapped in newlines, "i.e.<answer>" with
# no space.
INFERENCE_SYSTEM_PROMPT = "\n" + SYSTEM_PROMPT.replace("i.e. <answer>", "i.e.<answer>") + "\n"
"""The system prompt as ThinkMorph's inferencer and the paper's evaluation harness send it: pass
it to :func:`context_builder` to reproduce the harness's figures; training uses SYSTEM_PROMPT."""

# The paper's Appendix E texts, shared by every natural-language backend.
REF_INTRO = PAPER_REF_INTRO
TRANSITION = PAPER_TRANSITION


def context_builder(system_prompt: str = SYSTEM_PROMPT) -> PaperContextBuilder:
    """The paper's layout with these texts.

    student = [system, problem image, question];
    teacher = student + [REF_INTRO, visual thought, TRANSITION].
    """
    return PaperContextBuilder(system_prompt=system_prompt, ref_intro=REF_INTRO, transition=TRANSITION)


def thinkmorph_target(thought_0: str, thought_1: str, answer: str) -> tuple[str, str]:
    """ThinkMorph's two output texts of a training row (the visual thought goes between them).

    Returns ``("<think>{thought_0}</think><image_start>",
    "<image_end><think>{thought_1}</think><answer>{answer}</answer>")``; the pieces are
    inserted as given, without stripping.
    """
    first = f"{THINK_START}{thought_0}{THINK_END}{IMAGE_START}"
    second = f"{IMAGE_END}{THINK_START}{thought_1}{THINK_END}{ANSWER_START}{answer}{ANSWER_END}"
    return first, second


def text_only_trace(thought: str, answer: str) -> str:
    """A text-only reasoning trace in ThinkMorph's output format, ``<think>{thought}</think>
    <answer>{answer}</answer>`` (no space between them; pieces inserted as given): the SFT
    control's target for a row's ``full_text_only_thought`` and answer."""
    return f"{THINK_START}{thought}{THINK_END}{ANSWER_START}{answer}{ANSWER_END}"
