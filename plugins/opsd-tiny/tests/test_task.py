"""Frozen-lake generation, rendering and scoring."""

import numpy as np
import pytest
import torch

from opsd_tiny.config import FrozenLakeParams
from opsd_tiny.task import FrozenLakeTask, LakeMap, generate_map, simulate, trace_text


def _lake():
    holes = np.zeros((5, 5), dtype=bool)
    holes[0, 1] = holes[2, 2] = True
    return LakeMap(holes, start=(0, 0), goal=(2, 3))


def test_generated_maps_respect_the_path_bounds():
    params = FrozenLakeParams()
    rng = np.random.default_rng(0)
    for _ in range(200):
        lake = generate_map(rng, params)
        path = lake.canonical_path()
        assert params.min_path <= len(path) <= params.max_path
        assert path[-1][1] == lake.goal and not lake.holes[lake.start] and not lake.holes[lake.goal]


def test_canonical_path_prefers_right_then_down_then_left_then_up():
    lake = _lake()
    path = lake.canonical_path()
    # From (0,0) R is blocked by a hole, so D; then R while it is optimal, then D to G.
    assert [move for move, _ in path] == ["D", "R", "R", "R", "D"]
    for (move, cell), (_, previous) in zip(path, [(None, lake.start)] + path[:-1]):
        options = [m for m in "RDLU" if lake.free(_step(previous, m)) and
                   lake.distance_to_goal[_step(previous, m)] == lake.distance_to_goal[previous] - 1]
        assert move == options[0]
        assert cell == _step(previous, move)


def _step(cell, move):
    delta = {"R": (0, 1), "D": (1, 0), "L": (0, -1), "U": (-1, 0)}[move]
    return (cell[0] + delta[0], cell[1] + delta[1])


def test_trace_text_interleaves_moves_and_cells():
    lake = _lake()
    assert trace_text(lake, [("D", (1, 0)), ("R", (1, 1))]) == "D c5 R c6"


@pytest.mark.parametrize(
    "response, correct",
    [
        ("D c5 R c6 R c7 D c12 R c13", False),  # D into the hole at c12
        ("D c5 R c6 R c7 R c8 D c13", True),
        ("D R R R D", True),  # cells are not needed to score
        ("R c1", False),  # hole
        ("U", False),  # off the board
        ("D c5 R c6", False),  # stops short
        ("", False),
        ("D R R R D D", False),  # passes the goal and ends off it
        ("D R R R D D U", True),  # ends back on the goal
    ],
)
def test_scorer_simulates_the_moves(response, correct):
    assert simulate(_lake(), response)[0] is correct


def test_problem_images_and_visual_thought_differ_only_along_the_path():
    task = FrozenLakeTask(FrozenLakeParams(pixel_noise=0.0))
    problem = task.eval_problems(1)[0]
    assert problem.image.shape == (3, 40, 40) and problem.image.dtype == torch.float32
    changed = (problem.image - problem.visual_thought).abs().sum(dim=0) > 0  # (40, 40)
    lake = problem.metadata["map"]
    cells = {lake.start} | {cell for _, cell in lake.canonical_path()}
    for row, column in zip(*np.nonzero(changed.numpy())):
        assert (row // 8, column // 8) in cells or _between(lake, row // 8, column // 8)
    assert changed.any()


def _between(lake, row, column):
    points = [lake.start] + [cell for _, cell in lake.canonical_path()]
    return any(min(a[0], b[0]) <= row <= max(a[0], b[0]) and min(a[1], b[1]) <= column <= max(a[1], b[1])
               for a, b in zip(points, points[1:]))


def test_streams_restart_at_any_position_and_eval_is_fixed():
    task = FrozenLakeTask()
    stream = task.train_problems(7)
    first = [next(stream) for _ in range(5)]
    again = list(zip(range(2), task.train_problems(7, start=3)))
    assert [p.id for _, p in again] == [first[3].id, first[4].id]
    assert torch.equal(again[0][1].image, first[3].image)
    assert [p.id for p in task.eval_problems(3)] == [p.id for p in FrozenLakeTask().eval_problems(3)]
    assert not {p.id for p in task.eval_problems()} & {p.id for p in first}


def test_reference_answers_score_correct_and_optimal():
    task = FrozenLakeTask()
    for problem in task.eval_problems(50):
        score = task.score(problem, problem.reference_answer)
        assert score.correct and score.extracted == "optimal"
