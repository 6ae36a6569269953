"""Run configs the emu3 backend cannot serve are refused by ``check_run`` before anything runs:
completion caps that do not fit beside the shortest student or teacher context (images at
``image_max_pixels``), and a forward cap with no room for a completion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opsd_emu3.backend import Emu3Backend
from opsd_emu3.config import Emu3Params

from opsd_core.api import ConfigError, Problem, context_floor, load_config

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "emu3-debug.toml"
POSITIONS = 1024  # the debug model's max_position_embeddings
SMALL = {"image_min_pixels": 16 * 16, "image_max_pixels": 32 * 32, "vt_grid": (4, 4)}


@pytest.fixture(scope="module")
def backend() -> Emu3Backend:
    return Emu3Backend(Emu3Params(flavour="debug", **SMALL))


@pytest.fixture(scope="module")
def floor(backend):
    largest = torch.zeros(3, 32, 32)
    return context_floor(backend, largest, largest)


def config(*overrides: str):
    return load_config(EXAMPLE, ["sampling.max_forward_tokens=1024", *overrides])


def test_the_floor_budgets_images_at_the_largest_size(backend, floor):
    grid = (32 // 8) * (32 // 8 + 1)  # rows x (codes + end of line)
    assert floor.teacher - floor.student > 2 * grid
    problem = Problem(id="q", image=torch.rand(3, 64, 64), question="")  # resized down to 32 x 32
    pair = backend.context_builder().build(problem, torch.rand(3, 64, 64))
    assert (backend.context_length(pair.student), backend.context_length(pair.teacher)) == (floor.student, floor.teacher)
    smaller = backend.context_builder().build(Problem(id="s", image=torch.rand(3, 16, 16), question=""), torch.rand(3, 16, 16))
    assert backend.context_length(smaller.teacher) < floor.teacher


def test_the_shipped_example_is_accepted(backend):
    backend.check_run(load_config(EXAMPLE))


def test_a_sampling_cap_beyond_the_student_context_is_refused_with_the_largest_that_fits(backend, floor):
    fits = POSITIONS - floor.student
    backend.check_run(config(f"sampling.max_completion_tokens={fits}", "eval.max_completion_tokens=8"))
    with pytest.raises(ConfigError) as caught:
        backend.check_run(config(f"sampling.max_completion_tokens={fits + 1}", "eval.max_completion_tokens=8"))
    message = str(caught.value)
    assert f"sampling.max_completion_tokens = {fits + 1} does not fit" in message
    assert "with images at backend.image_max_pixels = 1024" in message
    assert "(max_position_embeddings)" in message and f"set it to at most {fits}" in message


def test_an_evaluation_cap_beyond_the_teacher_context_is_refused(backend, floor):
    fits = POSITIONS - floor.teacher
    backend.check_run(config(f"eval.max_completion_tokens={fits}"))
    with pytest.raises(ConfigError, match=rf"eval.max_completion_tokens = {fits + 1} does not fit.*at most {fits}"):
        backend.check_run(config(f"eval.max_completion_tokens={fits + 1}"))


def test_a_forward_cap_without_room_for_a_completion_is_refused(backend, floor):
    backend.check_run(config(f"sampling.max_forward_tokens={floor.teacher + 2}"))
    with pytest.raises(ConfigError, match=rf"max_forward_tokens = {floor.teacher + 1} leaves no room.*at least {floor.teacher + 2}"):
        backend.check_run(config(f"sampling.max_forward_tokens={floor.teacher + 1}"))
