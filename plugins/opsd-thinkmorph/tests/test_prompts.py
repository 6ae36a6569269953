"""The recipe's prompt texts, the paper's context layout and ThinkMorph's output format."""

import pytest
from PIL import Image

from opsd_core.api import PROBLEM_IMAGE, QUESTION, REF_INTRO, SYSTEM, TRANSITION, VISUAL_THOUGHT, Problem
from opsd_thinkmorph import prompts


@pytest.fixture
def problem():
    return Problem(
        id="Visual_Search/7",
        image=Image.new("RGB", (4, 4), "red"),
        question="What colour is the cup?",
        reference_answer="red",
        visual_thought=Image.new("RGB", (4, 4), "blue"),
    )


def test_student_context_is_system_image_question(problem):
    student = prompts.context_builder().student_context(problem)
    assert student.names() == (SYSTEM, PROBLEM_IMAGE, QUESTION)
    assert student.get(SYSTEM).text == prompts.SYSTEM_PROMPT
    assert student.get(PROBLEM_IMAGE).image is problem.image
    assert student.get(QUESTION).text == problem.question


def test_teacher_context_extends_the_student_one(problem):
    pair = prompts.context_builder().build(problem)
    assert pair.teacher.segments[: len(pair.student.segments)] == pair.student.segments
    assert pair.teacher.names() == (SYSTEM, PROBLEM_IMAGE, QUESTION, REF_INTRO, VISUAL_THOUGHT, TRANSITION)
    assert pair.teacher.get(REF_INTRO).text == prompts.REF_INTRO
    assert pair.teacher.get(VISUAL_THOUGHT).image is problem.visual_thought
    assert pair.teacher.get(TRANSITION).text == prompts.TRANSITION


def test_a_generated_visual_thought_replaces_the_stored_one(problem):
    drawn = Image.new("RGB", (4, 4), "green")
    assert prompts.context_builder().build(problem, drawn).teacher.get(VISUAL_THOUGHT).image is drawn


def test_the_system_prompt_can_be_swapped_for_the_inference_variant(problem):
    student = prompts.context_builder(prompts.INFERENCE_SYSTEM_PROMPT).student_context(problem)
    assert student.get(SYSTEM).text == prompts.INFERENCE_SYSTEM_PROMPT


def test_teacher_texts_are_the_papers_appendix_e():
    assert prompts.REF_INTRO == (
        "The following images are privileged visual references that depict the intermediate visual thoughts on "
        "the path to the correct answer. Use them silently as grounding context; do not describe or echo them."
    )
    assert (
        prompts.TRANSITION == "Now, using your own independent reasoning, answer the problem above. Think step by step."
    )


def test_training_and_inference_system_prompts_differ_only_in_newlines_and_one_space():
    training, inference = prompts.SYSTEM_PROMPT, prompts.INFERENCE_SYSTEM_PROMPT
    assert "\n" not in training and training == training.strip()
    assert training.startswith("Let's think step by step to answer the question.")
    assert training.endswith("i.e. <answer> answer here </answer>.")
    assert inference.startswith("\n") and inference.endswith("\n")
    assert "i.e.<answer> answer here </answer>." in inference and "i.e. <answer>" not in inference
    assert inference.strip().replace("i.e.<answer>", "i.e. <answer>") == training
    for marker in ("<think> </think>", "<image_start> </image_end>", "<answer></answer>"):
        assert marker in training


def test_thinkmorph_target_is_the_two_output_texts():
    first, second = prompts.thinkmorph_target("look at the bars", " the tallest is B ", "B")
    assert first == "<think>look at the bars</think><image_start>"
    assert second == "<image_end><think> the tallest is B </think><answer>B</answer>"
    assert first.endswith(prompts.IMAGE_START) and second.startswith(prompts.IMAGE_END)
    markers = (prompts.THINK_START, prompts.THINK_END, prompts.ANSWER_START, prompts.ANSWER_END)
    assert markers == ("<think>", "</think>", "<answer>", "</answer>")


def test_text_only_trace_is_think_then_answer():
    assert prompts.text_only_trace(" the bars rise ", "B") == "<think> the bars rise </think><answer>B</answer>"
