"""Scorers and aggregations of the paper's benchmarks, as pure functions.

Owns: VSP maze simulation, ChartQA relaxed accuracy (gold-relative 5 %, with a flag for the
harness's swapped form), circular grouping (SAT), per-source averaging (CV-Bench 2D) and pair
accuracy (MMVP).
Does not know: files, prompts or models.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

from opsd_core.evaluation.answers import answer_tag, boxed, strip_round_markers

CIRCULAR_OFFSET = 1_000_000
_MAZE_STEPS = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


# ---------------------------------------------------------------- VSP (maze navigation)
def maze_moves(response: str) -> list[str] | None:
    r"""The moves in the last ``\boxed{...}`` (e.g. ``\boxed{L, R, D}``), or None if there is
    no boxed answer or it holds anything other than U/D/L/R separated by commas or spaces."""
    content = boxed(response)
    if content is None:
        return None
    moves = [part.strip().upper() for part in re.split(r"[,\s]+", content) if part.strip()]
    if not moves or any(move not in _MAZE_STEPS for move in moves):
        return None
    return moves


def simulate_maze(maze_map: Sequence[str], moves: Sequence[str]) -> bool:
    """True when ``moves`` lead from S to G on ``maze_map`` (rows of S/F/H/G) without leaving
    the grid or stepping on a hole H, ending on G."""
    rows = [list(row) for row in maze_map]
    start = next((r, c) for r, row in enumerate(rows) for c, cell in enumerate(row) if cell == "S")
    row, column = start
    for move in moves:
        step = _MAZE_STEPS[move]
        row, column = row + step[0], column + step[1]
        if not (0 <= row < len(rows) and 0 <= column < len(rows[row])) or rows[row][column] == "H":
            return False
    return rows[row][column] == "G"


def score_vsp(response: str, maze_map: Sequence[str]) -> bool:
    moves = maze_moves(response)
    return moves is not None and simulate_maze(maze_map, moves)


# ---------------------------------------------------------------- ChartQA (relaxed accuracy)
def _to_number(text: str) -> float | None:
    text = text.strip().replace(",", "")
    percent = text.endswith("%")
    if percent:
        text = text[:-1].strip()
    if not _NUMBER.match(text):
        return None
    value = float(text)
    return value / 100.0 if percent else value


def relaxed_correct(prediction: str, gold: str, tolerance: float = 0.05, swapped: bool = False) -> bool:
    """ChartQA's relaxed accuracy: numbers within ``tolerance`` relative change of the gold
    (``|p - g| / |g|``; with ``swapped`` the harness's form ``|p - g| / |p|``), others equal
    case-insensitively. ``%`` divides by 100. A zero reference needs an exact match."""
    predicted, target = _to_number(prediction), _to_number(gold)
    if predicted is not None and target is not None:
        reference = predicted if swapped else target
        if reference == 0:
            return predicted == target
        return abs(predicted - target) / abs(reference) <= tolerance
    return prediction.strip().lower() == gold.strip().lower()


def chartqa_prediction(response: str) -> str:
    """The answer a ChartQA response gives: its last ``<answer>`` tag (round markers removed),
    else the whole stripped response."""
    cleaned = strip_round_markers(response)
    return answer_tag(cleaned) or cleaned


def score_chartqa(response: str, golds: str | Iterable[str], swapped: bool = False) -> bool:
    """Correct when the prediction is relaxed-correct for any gold answer."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    prediction = chartqa_prediction(response)
    return any(relaxed_correct(prediction, gold, swapped=swapped) for gold in golds)


# ---------------------------------------------------------------- aggregations
def circular_accuracy(hits: Mapping[int, bool]) -> float:
    """Accuracy over questions where a question (``index mod 1e6``) counts only if all its
    option-rotated copies (indices >= 1e6) are correct."""
    groups: dict[int, bool] = {}
    for index, hit in hits.items():
        key = index % CIRCULAR_OFFSET
        groups[key] = groups.get(key, True) and bool(hit)
    return sum(groups.values()) / len(groups) if groups else 0.0


def mean_of_group_accuracies(hits: Mapping[int, bool], group_of: Mapping[int, str]) -> float:
    """Mean over groups of each group's accuracy (CV-Bench 2D averages its sources)."""
    by_group: dict[str, list[bool]] = defaultdict(list)
    for index, hit in hits.items():
        by_group[group_of[index]].append(bool(hit))
    if not by_group:
        return 0.0
    return sum(sum(group) / len(group) for group in by_group.values()) / len(by_group)


def pair_accuracy(hits: Mapping[int, bool]) -> float:
    """MMVP pair accuracy: questions with 1-based indices (2k-1, 2k) form a pair, which counts
    only if both are correct."""
    pairs: dict[int, bool] = {}
    for index, hit in hits.items():
        key = (index - 1) // 2
        pairs[key] = pairs.get(key, True) and bool(hit)
    return sum(pairs.values()) / len(pairs) if pairs else 0.0
