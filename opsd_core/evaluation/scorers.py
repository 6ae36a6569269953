"""Relaxed numeric matching for tasks, and the aggregations of the paper's benchmarks, as pure functions.

Owns: the lenient relaxed accuracy tasks score free answers with (gold-relative 5 %, thousands
separators dropped, a flag for the prediction-relative form), the option-rotation offset of
circular questions, per-source averaging (CV-Bench 2D) and pair accuracy (MMVP).
Does not know: files, prompts or models; the benchmarks' harness-exact rules
(:mod:`opsd_core.evaluation.rules`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping

CIRCULAR_OFFSET = 1_000_000
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


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
    """Lenient relaxed accuracy: numbers within ``tolerance`` relative change of the gold
    (``|p - g| / |g|``; with ``swapped`` ``|p - g| / |p|``), others equal case-insensitively.
    Thousands separators are dropped and ``%`` divides by 100; a zero reference needs an exact
    match."""
    predicted, target = _to_number(prediction), _to_number(gold)
    if predicted is not None and target is not None:
        reference = predicted if swapped else target
        if reference == 0:
            return predicted == target
        return abs(predicted - target) / abs(reference) <= tolerance
    return prediction.strip().lower() == gold.strip().lower()


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
