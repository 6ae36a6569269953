"""The frozen-lake task: procedural maps, the problem image, the drawn-path visual thought,
reference traces and the scorer.

Owns: map generation (holes, start S, goal G, shortest path within bounds), the canonical
shortest path (first optimal move in the order R > D > L > U), rendering, the completion
format ``R c7 D c12 ...`` (each move followed by the cell it reaches), and scoring a response
by simulating its moves.
Does not know: models, tokens or contexts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from opsd_core.interfaces import Task
from opsd_core.types import Problem, Score
from opsd_tiny.config import FrozenLakeParams
from opsd_tiny.context import QUESTION
from opsd_tiny.vocab import MOVES, cell_token

STEPS = {"R": (0, 1), "D": (1, 0), "L": (0, -1), "U": (-1, 0)}
ICE, HOLE, START, GOAL, PATH = (0.85, 0.92, 1.0), (0.05, 0.10, 0.40), (0.10, 0.75, 0.20), (1.0, 0.85, 0.10), (0.90, 0.10, 0.10)


@dataclass(frozen=True)
class LakeMap:
    """One map: ``holes`` is a (size, size) bool array; cells are (row, column)."""

    holes: np.ndarray
    start: tuple[int, int]
    goal: tuple[int, int]

    @property
    def size(self) -> int:
        return int(self.holes.shape[0])

    def free(self, cell: tuple[int, int]) -> bool:
        row, column = cell
        return 0 <= row < self.size and 0 <= column < self.size and not self.holes[row, column]

    def cell_index(self, cell: tuple[int, int]) -> int:
        return cell[0] * self.size + cell[1]

    @cached_property
    def distance_to_goal(self) -> np.ndarray:
        """(size, size) int array: moves from each cell to G avoiding holes (-1: unreachable)."""
        distance = np.full(self.holes.shape, -1, dtype=np.int64)
        distance[self.goal] = 0
        queue = deque([self.goal])
        while queue:
            cell = queue.popleft()
            for step in STEPS.values():
                neighbour = (cell[0] + step[0], cell[1] + step[1])
                if self.free(neighbour) and distance[neighbour] < 0:
                    distance[neighbour] = distance[cell] + 1
                    queue.append(neighbour)
        return distance

    def canonical_path(self, origin: tuple[int, int] | None = None) -> list[tuple[str, tuple[int, int]]]:
        """The shortest path to G from ``origin`` (default S) as (move, cell reached) pairs,
        taking the first optimal move in the order R, D, L, U."""
        cell = self.start if origin is None else origin
        path = []
        while cell != self.goal:
            for move in MOVES:
                step = STEPS[move]
                neighbour = (cell[0] + step[0], cell[1] + step[1])
                if self.free(neighbour) and self.distance_to_goal[neighbour] == self.distance_to_goal[cell] - 1:
                    path.append((move, neighbour))
                    cell = neighbour
                    break
        return path


def trace_text(lake: LakeMap, path: Sequence[tuple[str, tuple[int, int]]]) -> str:
    """``R c7 D c12 ...``: each move followed by the cell it reaches."""
    return " ".join(f"{move} {cell_token(lake.cell_index(cell))}" for move, cell in path)


def generate_map(rng: np.random.Generator, params: FrozenLakeParams) -> LakeMap:
    """A random map whose shortest S-to-G path is within the configured bounds."""
    size = params.size
    while True:
        holes = rng.random((size, size)) < params.hole_probability
        free = np.argwhere(~holes)
        if len(free) < 2:
            continue
        start_index, goal_index = rng.choice(len(free), size=2, replace=False)
        lake = LakeMap(holes, tuple(int(v) for v in free[start_index]), tuple(int(v) for v in free[goal_index]))
        distance = lake.distance_to_goal[lake.start]
        if params.min_path <= distance <= params.max_path:
            return lake


def render(lake: LakeMap, params: FrozenLakeParams, rng: np.random.Generator, path: Sequence | None = None) -> torch.Tensor:
    """float32 (3, H, W) image in [0, 1] of the map; with ``path``, the path drawn in red."""
    pixels = params.cell_pixels
    side = lake.size * pixels
    image = np.empty((side, side, 3), dtype=np.float32)
    image[:] = ICE
    for row, column in np.argwhere(lake.holes):
        image[row * pixels : (row + 1) * pixels, column * pixels : (column + 1) * pixels] = HOLE
    image[::pixels, :] *= 0.9
    image[:, ::pixels] *= 0.9
    margin = pixels // 4
    for cell, colour in ((lake.start, START), (lake.goal, GOAL)):
        top, left = cell[0] * pixels + margin, cell[1] * pixels + margin
        image[top : top + pixels - 2 * margin, left : left + pixels - 2 * margin] = colour
    if path:
        centre = pixels // 2
        points = [lake.start] + [cell for _, cell in path]
        for (r0, c0), (r1, c1) in zip(points, points[1:]):
            top, bottom = sorted((r0 * pixels + centre, r1 * pixels + centre))
            left, right = sorted((c0 * pixels + centre, c1 * pixels + centre))
            image[top - 1 : bottom + 1, left - 1 : right + 1] = PATH
    image += rng.normal(0.0, params.pixel_noise, size=image.shape).astype(np.float32)
    return torch.from_numpy(np.clip(image, 0.0, 1.0).transpose(2, 0, 1).copy())


def make_problem(lake: LakeMap, params: FrozenLakeParams, rng: np.random.Generator, problem_id: str) -> Problem:
    path = lake.canonical_path()
    return Problem(
        id=problem_id,
        image=render(lake, params, rng),
        question=QUESTION,
        reference_answer=trace_text(lake, path),
        visual_thought=render(lake, params, rng, path),
        metadata={"map": lake, "optimal_moves": len(path)},
    )


def simulate(lake: LakeMap, response: str) -> tuple[bool, int]:
    """(reaches G safely, number of moves) for the moves in ``response``; other words are
    ignored, and the walk fails on leaving the board or entering a hole."""
    cell, moves = lake.start, 0
    for word in response.split():
        if word not in STEPS:
            continue
        step = STEPS[word]
        cell = (cell[0] + step[0], cell[1] + step[1])
        moves += 1
        if not lake.free(cell):
            return False, moves
    return moves > 0 and cell == lake.goal, moves


class FrozenLakeTask(Task):
    """Problems generated from (seed, index), so any stream position can be regenerated."""

    def __init__(self, params: FrozenLakeParams | None = None):
        self.params = params or FrozenLakeParams()
        self._eval: list[Problem] | None = None

    def problem(self, seed: int, index: int, split: str = "train") -> Problem:
        rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
        return make_problem(generate_map(rng, self.params), self.params, rng, f"{split}-{seed}-{index}")

    def train_problems(self, seed: int, start: int = 0) -> Iterator[Problem]:
        index = start
        while True:
            yield self.problem(seed, index)
            index += 1

    def eval_problems(self, limit: int | None = None) -> Sequence[Problem]:
        if self._eval is None:
            self._eval = [self.problem(self.params.eval_seed, i, "eval") for i in range(self.params.eval_size)]
        return self._eval if limit is None else self._eval[:limit]

    def score(self, problem: Problem, response: str) -> Score:
        lake: LakeMap = problem.metadata["map"]
        correct, moves = simulate(lake, response)
        optimal = correct and moves == problem.metadata["optimal_moves"]
        return Score(correct=correct, value=float(correct), extracted="optimal" if optimal else None)
