"""Frozen-lake generation, rendering, detour traces and scoring."""

from itertools import pairwise

import numpy as np
import pytest
import torch

from opsd_tiny.config import FrozenLakeParams
from opsd_tiny.task import (
    STEPS,
    FrozenLakeTask,
    LakeMap,
    detour_path,
    generate_map,
    neighbour,
    trace_text,
    walk,
)

# S . H . .
# . . . . .
# . . H G .      (row, column); S = (0, 0), G = (2, 3)
# . . . . .
# . . . . .
ROWS = ("SFHFF", "FFFFF", "FFHGF", "FFFFF", "FFFFF")


@pytest.fixture
def lake():
    return LakeMap.from_rows(ROWS)


def test_map_rows_round_trip(lake):
    assert lake.start == (0, 0) and lake.goal == (2, 3) and lake.holes[0, 2] and lake.holes[2, 2]
    assert lake.rows() == ROWS


def test_generated_maps_respect_the_path_bounds():
    params = FrozenLakeParams()
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(300):
        lake = generate_map(rng, params)
        path = lake.canonical_path()
        lengths.append(len(path))
        assert params.min_path <= len(path) <= params.max_path
        assert len(path) == lake.distance_to_goal[lake.start]
        assert path[-1][1] == lake.goal and lake.free(lake.start) and lake.free(lake.goal)
        assert all(lake.free(cell) for _, cell in path)
    assert min(lengths) == params.min_path and max(lengths) > 7


def test_impossible_bounds_are_a_clear_error():
    params = FrozenLakeParams(size=3, min_path=10, max_path=12)
    with pytest.raises(ValueError, match="widen the bounds"):
        generate_map(np.random.default_rng(0), params)


def test_canonical_path_takes_the_first_optimal_move_in_r_d_l_u_order(lake):
    # From S, R and D both start shortest paths: R wins; at (0, 1) the hole forces D.
    assert trace_text(lake, lake.canonical_path()) == "R c1 D c6 R c7 R c8 D c13"
    rng = np.random.default_rng(1)
    for _ in range(100):
        random_lake = generate_map(rng, FrozenLakeParams())
        cell = random_lake.start
        for move, reached in random_lake.canonical_path():
            optimal = [
                m
                for m in "RDLU"
                if random_lake.free(neighbour(cell, m))
                and random_lake.distance_to_goal[neighbour(cell, m)] == random_lake.distance_to_goal[cell] - 1
            ]
            assert move == optimal[0] and reached == neighbour(cell, move)
            cell = reached


def test_detour_paths_take_one_non_optimal_move_then_recover(lake):
    rng = np.random.default_rng(0)
    seen_detour = seen_plain = False
    for _ in range(200):
        path, index = detour_path(lake, rng, probability=0.5)
        assert walk(lake, trace_text(lake, path)).failure is None
        if index is None:
            seen_plain = True
            assert path == lake.canonical_path()
            continue
        seen_detour = True
        cells = [lake.start] + [cell for _, cell in path]
        before, landed = cells[index], path[index][1]
        assert lake.distance_to_goal[landed] == lake.distance_to_goal[before] + 1
        assert path[:index] == lake.canonical_path()[:index]
        assert path[index + 1 :] == lake.canonical_path(landed)
    assert seen_detour and seen_plain
    assert detour_path(lake, rng, probability=0.0) == (lake.canonical_path(), None)


@pytest.mark.parametrize(
    "response, failure",
    [
        ("R c1 D c6 R c7 R c8 D c13", None),
        ("R D R R D", None),  # cell words are not needed to score
        ("D R R R D U D", None),  # longer but ends on G
        ("R c1 R c2", "hole"),
        ("U c0", "off board"),
        ("L", "off board"),
        ("R D R", "ends off goal"),
        ("R D R R D D", "ends off goal"),  # passes G and stops past it
        ("", "no moves"),
        ("c1 c6", "no moves"),
    ],
)
def test_walk_simulates_the_moves(lake, response, failure):
    assert walk(lake, response).failure == failure


def test_score_records_correctness_and_optimality():
    task = FrozenLakeTask()
    problem = task.eval_problems(1)[0]
    reference = task.score(problem, problem.reference_answer)
    assert reference.correct and reference.value == 1.0 and reference.extracted == "optimal"
    moves = problem.reference_answer.split()[::2]
    back_and_forth = {"R": "L", "L": "R", "U": "D", "D": "U"}
    detour = " ".join(moves + [back_and_forth[moves[-1]], moves[-1]])
    assert task.score(problem, detour).extracted == "+2 moves"
    wrong = task.score(problem, "")
    assert not wrong.correct and wrong.value == 0.0 and wrong.extracted == "no moves"


def test_images_have_the_documented_shape_and_range():
    problem = FrozenLakeTask().eval_problems(1)[0]
    for image in (problem.image, problem.visual_thought):
        assert image.shape == (3, 40, 40) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_visual_thought_differs_from_the_problem_image_only_along_the_path():
    for problem in FrozenLakeTask().eval_problems(20):
        lake = LakeMap.from_rows(problem.metadata["map"])
        changed = (problem.image - problem.visual_thought).abs().sum(dim=0) > 0  # (40, 40)
        assert changed.any()
        points = [lake.start] + [cell for _, cell in lake.canonical_path()]
        segments = list(pairwise(points))
        for row, column in zip(*np.nonzero(changed.numpy())):
            cell = (row // 8, column // 8)
            assert any(
                min(a[0], b[0]) <= cell[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= cell[1] <= max(a[1], b[1])
                for a, b in segments
            ), (problem.id, cell)


def test_streams_restart_at_any_position_and_eval_is_fixed():
    task = FrozenLakeTask()
    stream = task.train_problems(7)
    first = [next(stream) for _ in range(5)]
    resumed = task.train_problems(7, start=3)
    again = [next(resumed) for _ in range(2)]
    assert [p.id for p in again] == [first[3].id, first[4].id]
    assert torch.equal(again[0].image, first[3].image) and again[1].metadata == first[4].metadata
    assert next(task.train_problems(8)).metadata != first[0].metadata
    assert [p.id for p in task.eval_problems(3)] == [p.id for p in FrozenLakeTask().eval_problems(3)]
    assert len(task.eval_problems()) == 1000 and task.eval_problems(2000) == task.eval_problems()
    assert not {p.id for p in task.eval_problems()} & {p.id for p in first}


def test_reference_answers_are_canonical_and_optimal():
    task = FrozenLakeTask()
    for problem in task.eval_problems(100):
        lake = LakeMap.from_rows(problem.metadata["map"])
        assert problem.reference_answer == trace_text(lake, lake.canonical_path())
        assert task.score(problem, problem.reference_answer).extracted == "optimal"
        assert set(problem.reference_answer.split()[::2]) <= set(STEPS)


def test_the_reference_trace_is_the_canonical_shortest_path_written_out():
    task = FrozenLakeTask()
    problem = task.problem(0, 3)
    assert problem.reference_trace == problem.reference_answer
    assert task.score(problem, problem.reference_trace).extracted == "optimal"
