"""Run configs the janus-pro backend cannot serve are refused by ``check_run`` before anything
runs: completion caps that do not fit beside the shortest student or teacher context, a forward
cap with no room for a completion, and a visual-thought prompt longer than the positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opsd_janus.backend import JanusBackend
from opsd_janus.config import JanusParams

from opsd_core.api import ConfigError, Problem, context_floor, load_config

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "janus-pro-debug.toml"
POSITIONS = 400  # backend.max_context_tokens of these tests (the debug model has 1024)


@pytest.fixture(scope="module")
def backend() -> JanusBackend:
    return JanusBackend(JanusParams(flavour="debug", image_size=32, image_tokens=16, max_context_tokens=POSITIONS))


@pytest.fixture(scope="module")
def floor(backend):
    blank = torch.zeros(3, 32, 32)
    return context_floor(backend, blank, blank)


def config(*overrides: str):
    return load_config(EXAMPLE, ["sampling.max_forward_tokens=400", *overrides])


def test_the_floor_counts_prompt_texts_and_image_blocks(backend, floor):
    image_block = backend.image_tokens + 2  # <begin_of_image>, the slots, <end_of_image>
    assert floor.student > image_block and floor.teacher > floor.student + image_block
    problem = Problem(id="q", image=torch.rand(3, 40, 24), question="which way to the goal?")
    pair = backend.context_builder().build(problem, torch.rand(3, 32, 32))
    assert backend.context_length(pair.student) > floor.student and backend.context_length(pair.teacher) > floor.teacher


def test_the_shipped_example_is_accepted(backend):
    backend.check_run(config())
    JanusBackend(JanusParams(flavour="debug", image_size=32, image_tokens=16)).check_run(load_config(EXAMPLE))


def test_a_sampling_cap_beyond_the_student_context_is_refused_with_the_largest_that_fits(backend, floor):
    fits = POSITIONS - floor.student
    backend.check_run(config(f"sampling.max_completion_tokens={fits}", "eval.max_completion_tokens=8"))
    with pytest.raises(ConfigError) as caught:
        backend.check_run(config(f"sampling.max_completion_tokens={fits + 1}", "eval.max_completion_tokens=8"))
    message = str(caught.value)
    assert f"sampling.max_completion_tokens = {fits + 1} does not fit" in message
    assert f"the student context takes {floor.student} positions before any question text" in message
    assert f"allows {POSITIONS} (backend.max_context_tokens" in message and f"set it to at most {fits}" in message


def test_an_evaluation_cap_beyond_the_teacher_context_is_refused(backend, floor):
    fits = POSITIONS - floor.teacher
    backend.check_run(config(f"eval.max_completion_tokens={fits}"))
    with pytest.raises(ConfigError, match=rf"eval.max_completion_tokens = {fits + 1} does not fit: evaluation answers in the teacher context too.*set eval.max_completion_tokens to at most {fits}"):
        backend.check_run(config(f"eval.max_completion_tokens={fits + 1}"))
    # Unset, the evaluation cap is sampling's: the message says so.
    with pytest.raises(ConfigError, match=r"sampling.max_completion_tokens \(the evaluation cap while eval.max_completion_tokens is unset\)"):
        backend.check_run(config(f"sampling.max_completion_tokens={fits + 1}"))


def test_a_forward_cap_without_room_for_a_completion_is_refused(backend, floor):
    backend.check_run(config(f"sampling.max_forward_tokens={floor.teacher + 2}"))
    with pytest.raises(ConfigError, match=rf"max_forward_tokens = {floor.teacher + 1} leaves no room.*at least {floor.teacher + 2}"):
        backend.check_run(config(f"sampling.max_forward_tokens={floor.teacher + 1}"))
    with pytest.raises(ConfigError, match="sampling.max_forward_tokens = 401 exceeds the 400 positions"):
        backend.check_run(config("sampling.max_forward_tokens=401"))


def test_a_visual_thought_prompt_beyond_the_positions_is_refused_unless_thoughts_are_stored():
    wordy = JanusBackend(
        JanusParams(flavour="debug", image_size=32, image_tokens=16, max_context_tokens=POSITIONS, vt_prompt="Draw it. " * 120)
    )
    with pytest.raises(ConfigError, match=r"sampling.visual_thoughts = 'generate': drawing a visual thought takes \d+ positions.*use 'stored'"):
        wordy.check_run(config("sampling.visual_thoughts='generate'"))
    with pytest.raises(ConfigError, match="sampling.visual_thoughts = 'auto'"):
        wordy.check_run(config("sampling.visual_thoughts='auto'"))
    wordy.check_run(config("sampling.visual_thoughts='stored'"))
