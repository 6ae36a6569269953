"""The frozen-lake task: procedural maps, the problem image, the drawn-path visual thought,
reference traces and the scorer.

Owns: map generation (holes, start S, goal G, shortest path within bounds), the canonical
shortest path (the first optimal move in the order R > D > L > U) and its trace (the reference
answer and the SFT control's reasoning trace), detour traces for pretraining, rendering, the completion format ``R c7 D c12 ...`` (each move followed by the
cell it reaches), scoring a response by walking its moves, and the classes of completion tokens
(moves, cells, and the prompt words and specials a completion should not contain).
Does not know: models, tokenizers or contexts. Problem i of a stream depends only on (seed, i),
so a stream can restart at any position.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise

import numpy as np
import torch

from opsd_core.api import Problem, Score, Task
from opsd_tiny.config import FrozenLakeParams
from opsd_tiny.context import QUESTION
from opsd_tiny.vocab import MOVES, PROMPT_WORDS, SPECIALS, cell_token

Cell = tuple[int, int]
Step = tuple[str, Cell]  # a move and the cell it reaches

STEPS = {"R": (0, 1), "D": (1, 0), "L": (0, -1), "U": (-1, 0)}
ICE, HOLE = (0.85, 0.92, 1.0), (0.05, 0.10, 0.40)
START, GOAL, PATH = (0.10, 0.75, 0.20), (1.0, 0.85, 0.10), (0.90, 0.10, 0.10)
GRID_LINE_SHADE = 0.9
# Stream tags keep the training, evaluation and pretraining problems of one seed apart.
SPLITS = {"train": 0, "eval": 1, "pretrain": 2}
MAX_MAP_ATTEMPTS = 10_000


def neighbour(cell: Cell, move: str) -> Cell:
    step = STEPS[move]
    return (cell[0] + step[0], cell[1] + step[1])


@dataclass(frozen=True, eq=False)
class LakeMap:
    """One map. ``holes`` is a bool (size, size) array; cells are (row, column)."""

    holes: np.ndarray
    start: Cell
    goal: Cell

    @property
    def size(self) -> int:
        return int(self.holes.shape[0])

    def free(self, cell: Cell) -> bool:
        """On the board and not a hole."""
        row, column = cell
        return 0 <= row < self.size and 0 <= column < self.size and not self.holes[row, column]

    def cell_index(self, cell: Cell) -> int:
        return cell[0] * self.size + cell[1]

    def rows(self) -> tuple[str, ...]:
        """The map as rows of S (start), G (goal), H (hole) and F (frozen), as in Gym's FrozenLake."""
        letters = np.where(self.holes, "H", "F")
        letters[self.start], letters[self.goal] = "S", "G"
        return tuple("".join(row) for row in letters)

    @classmethod
    def from_rows(cls, rows: Sequence[str]) -> LakeMap:
        letters = np.array([list(row) for row in rows])
        start, goal = (tuple(int(v) for v in np.argwhere(letters == mark)[0]) for mark in "SG")
        return cls(letters == "H", start, goal)

    @cached_property
    def distance_to_goal(self) -> np.ndarray:
        """int64 (size, size): moves from each cell to G around the holes; -1 where unreachable."""
        distance = np.full(self.holes.shape, -1, dtype=np.int64)
        distance[self.goal] = 0
        queue = deque([self.goal])
        while queue:
            cell = queue.popleft()
            for move in MOVES:
                nearer = neighbour(cell, move)
                if self.free(nearer) and distance[nearer] < 0:
                    distance[nearer] = distance[cell] + 1
                    queue.append(nearer)
        return distance

    def optimal_moves(self, cell: Cell) -> list[str]:
        """The moves from ``cell`` that start a shortest path to G, in canonical order."""
        remaining = self.distance_to_goal[cell]
        return [
            move
            for move in MOVES
            if self.free(neighbour(cell, move)) and self.distance_to_goal[neighbour(cell, move)] == remaining - 1
        ]

    def canonical_path(self, origin: Cell | None = None) -> list[Step]:
        """The shortest path from ``origin`` (default S) to G, taking the first optimal move in
        the order R, D, L, U at every cell."""
        cell = self.start if origin is None else origin
        path = []
        while cell != self.goal:
            move = self.optimal_moves(cell)[0]
            cell = neighbour(cell, move)
            path.append((move, cell))
        return path


def trace_text(lake: LakeMap, path: Sequence[Step]) -> str:
    """The completion text of ``path``: ``R c7 D c12 ...``, each move then the cell it reaches."""
    return " ".join(f"{move} {cell_token(lake.cell_index(cell))}" for move, cell in path)


def detour_path(lake: LakeMap, rng: np.random.Generator, probability: float) -> tuple[list[Step], int | None]:
    """The canonical path, or with ``probability`` one whose move k is a random non-optimal
    move onto a free cell, followed by the canonical path from where it landed.

    Returns the path and k (None without a detour). Pretraining leaves move k untrained and
    trains its cell token and the recovery, so the model learns to track the position off the
    drawn path (what on-policy samples need).
    """
    path = lake.canonical_path()
    if rng.random() >= probability:
        return path, None
    cells = [lake.start] + [cell for _, cell in path[:-1]]
    choices = [
        (index, move)
        for index, cell in enumerate(cells)
        for move in MOVES
        if lake.free(neighbour(cell, move)) and move not in lake.optimal_moves(cell)
    ]
    if not choices:
        return path, None
    index, move = choices[int(rng.integers(len(choices)))]
    landed = neighbour(cells[index], move)
    return path[:index] + [(move, landed)] + lake.canonical_path(landed), index


def generate_map(rng: np.random.Generator, params: FrozenLakeParams) -> LakeMap:
    """A random map whose shortest S-to-G path has ``min_path`` to ``max_path`` moves."""
    for _ in range(MAX_MAP_ATTEMPTS):
        holes = rng.random((params.size, params.size)) < params.hole_probability
        free = np.argwhere(~holes)
        if len(free) < 2:
            continue
        start, goal = (tuple(int(v) for v in free[i]) for i in rng.choice(len(free), size=2, replace=False))
        lake = LakeMap(holes, start, goal)
        if params.min_path <= lake.distance_to_goal[start] <= params.max_path:
            return lake
    raise ValueError(
        f"no {params.size}x{params.size} map with hole probability {params.hole_probability} and a shortest "
        f"path of {params.min_path}..{params.max_path} moves in {MAX_MAP_ATTEMPTS} tries; widen the bounds"
    )


def draw_scene(lake: LakeMap, cell_pixels: int) -> np.ndarray:
    """float32 (H, W, 3) noise-free scene: ice, holes, faint grid lines, S and G markers."""
    side = lake.size * cell_pixels
    image = np.empty((side, side, 3), dtype=np.float32)
    image[:] = ICE
    for row, column in np.argwhere(lake.holes):
        image[row * cell_pixels : (row + 1) * cell_pixels, column * cell_pixels : (column + 1) * cell_pixels] = HOLE
    image[::cell_pixels, :] *= GRID_LINE_SHADE
    image[:, ::cell_pixels] *= GRID_LINE_SHADE
    margin = cell_pixels // 4
    for (row, column), colour in ((lake.start, START), (lake.goal, GOAL)):
        top, left = row * cell_pixels + margin, column * cell_pixels + margin
        image[top : top + cell_pixels - 2 * margin, left : left + cell_pixels - 2 * margin] = colour
    return image


def draw_path(scene: np.ndarray, lake: LakeMap, path: Sequence[Step], cell_pixels: int) -> np.ndarray:
    """A copy of ``scene`` with ``path`` drawn from S as a 2-px red line through cell centres."""
    image = scene.copy()
    centre = cell_pixels // 2
    points = [lake.start] + [cell for _, cell in path]
    for (r0, c0), (r1, c1) in pairwise(points):
        top, bottom = sorted((r0 * cell_pixels + centre, r1 * cell_pixels + centre))
        left, right = sorted((c0 * cell_pixels + centre, c1 * cell_pixels + centre))
        image[top - 1 : bottom + 1, left - 1 : right + 1] = PATH
    return image


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """float32 (3, H, W) in [0, 1] from a float (H, W, 3) array."""
    return torch.from_numpy(np.ascontiguousarray(np.clip(image, 0.0, 1.0).transpose(2, 0, 1)))


def make_problem(lake: LakeMap, params: FrozenLakeParams, rng: np.random.Generator, problem_id: str) -> Problem:
    """The problem image, the VT (the same pixels, noise included, plus the canonical path) and
    the canonical trace as reference answer and as the SFT control's text-only reasoning trace
    (the completion format writes the reasoning out: each move, then the cell it reaches)."""
    path = lake.canonical_path()
    scene = draw_scene(lake, params.cell_pixels)
    noise = rng.normal(0.0, params.pixel_noise, size=scene.shape).astype(np.float32)
    return Problem(
        id=problem_id,
        image=to_tensor(scene + noise),
        question=QUESTION,
        reference_answer=trace_text(lake, path),
        visual_thought=to_tensor(draw_path(scene, lake, path, params.cell_pixels) + noise),
        metadata={"map": lake.rows(), "optimal_moves": len(path)},
        reference_trace=trace_text(lake, path),
    )


@dataclass(frozen=True)
class Walk:
    """Where a response's moves lead: ``failure`` is None when they end on G safely, else
    ``"no moves"``, ``"off board"``, ``"hole"`` or ``"ends off goal"``."""

    moves: tuple[str, ...]
    failure: str | None


def walk(lake: LakeMap, response: str) -> Walk:
    """Follow the move words of ``response`` from S (cell words and others are ignored)."""
    moves = tuple(word for word in response.split() if word in STEPS)
    if not moves:
        return Walk(moves, "no moves")
    cell = lake.start
    for move in moves:
        cell = neighbour(cell, move)
        row, column = cell
        if not (0 <= row < lake.size and 0 <= column < lake.size):
            return Walk(moves, "off board")
        if lake.holes[cell]:
            return Walk(moves, "hole")
    return Walk(moves, None if cell == lake.goal else "ends off goal")


class FrozenLakeTask(Task):
    """Frozen-lake problems generated from (seed, index); the evaluation set from ``eval_seed``."""

    def __init__(self, params: FrozenLakeParams | None = None):
        self.params = params or FrozenLakeParams()
        self._eval: list[Problem] = []

    def problem(self, seed: int, index: int, split: str = "train") -> Problem:
        """Problem ``index`` of the ``split`` stream of ``seed`` (``train``, ``eval`` or ``pretrain``)."""
        rng = np.random.default_rng([seed, index, SPLITS[split]])
        return make_problem(generate_map(rng, self.params), self.params, rng, f"{split}-{seed}-{index}")

    def train_problems(self, seed: int, start: int = 0) -> Iterator[Problem]:
        index = start
        while True:
            yield self.problem(seed, index)
            index += 1

    def eval_problems(self, limit: int | None = None) -> Sequence[Problem]:
        count = self.params.eval_size if limit is None else min(limit, self.params.eval_size)
        while len(self._eval) < count:
            self._eval.append(self.problem(self.params.eval_seed, len(self._eval), "eval"))
        return self._eval[:count]

    def score(self, problem: Problem, response: str) -> Score:
        """Correct when the moves stay on the board, avoid holes and end on G. ``extracted``
        says ``optimal``, ``+k moves`` (correct but longer) or why it failed."""
        result = walk(LakeMap.from_rows(problem.metadata["map"]), response)
        if result.failure is not None:
            return Score(correct=False, value=0.0, extracted=result.failure)
        extra = len(result.moves) - problem.metadata["optimal_moves"]
        return Score(correct=True, value=1.0, extracted="optimal" if extra == 0 else f"+{extra} moves")

    def token_class(self, token: str) -> str | None:
        """``move`` (R, D, L, U: the decisions), ``cell`` (c0, c1, ...: where a move lands, which
        the map determines once the move is made), ``prompt word`` or ``special`` (words that have
        no place in a completion), None for anything else."""
        if token in STEPS:
            return "move"
        if token.startswith("c") and token[1:].isdigit():
            return "cell"
        if token in PROMPT_WORDS:
            return "prompt word"
        if token in SPECIALS:
            return "special"
        return None
