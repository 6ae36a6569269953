"""The paper's nine benchmarks as evaluation-only tasks: which files, which prompt, which rule, which figures.

Owns: each benchmark's definition: its VLMEvalKit TSV files and the columns its rows need, its
Hugging Face parquet release (:mod:`opsd_benchmarks.releases`), the prompt its items are asked
with, the harness rule that scores a response (multiple choice, circular copies, VSP's maze
walk, ChartQA's relaxed accuracy) and the figures the harness reports for it (SAT's circular
questions, CV-Bench's 2D source means and 3D, MMVP's pairs, ChartQA per file, categories).
Does not know: how files are read, how answers are produced or how results are written (the
core's evaluation machinery); models and backends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opsd_core.api.benchmarks import (
    BenchmarkDataError,
    BenchmarkItem,
    BenchmarkTask,
    Verdict,
    category_accuracies,
    chartqa,
    circular_copy,
    circular_groups,
    maze_rows,
    mean_of_group_accuracies,
    multiple_choice,
    multiple_choice_prompt,
    pair_accuracy,
    vsp,
)
from opsd_benchmarks.releases import RELEASES


class MultipleChoiceTask(BenchmarkTask):
    """Option letters, matched by the harness's multiple-choice rule against the gold letter."""

    judged_as = "mcq"

    def verdict(self, item: BenchmarkItem, response: str, chartqa_gold_relative: bool = False) -> Verdict:
        return multiple_choice(response, item.options, str(item.answer))


class VspTask(BenchmarkTask):
    """VSP maze navigation: the response's boxed moves walked from S to G on the row's maze."""

    name = "vsp"
    files = ("VSP_maze_task_main_original.tsv",)
    columns = ("maze_map",)
    integer_columns = ("maze_size",)

    def verdict(self, item: BenchmarkItem, response: str, chartqa_gold_relative: bool = False) -> Verdict:
        maze = item.extra.get("maze_map")
        if maze is None:
            raise BenchmarkDataError(f"{item.source_file}, index {item.index}: a VSP row needs its maze_map column")
        return vsp(response, str(maze), int(item.extra.get("maze_size") or len(maze_rows(str(maze)))))


class VisPuzzleTask(MultipleChoiceTask):
    name = "vispuzzle"
    files = ("VisPuzzle.tsv",)


class BlinkJigsawTask(MultipleChoiceTask):
    name = "blink-jigsaw"
    files = ("BLINK_Jigsaw.tsv",)
    release = RELEASES["blink-jigsaw"]


class BlinkTask(MultipleChoiceTask):
    """BLINK's subtasks pooled; ``categories`` holds each subtask's accuracy."""

    name = "blink"
    files = ("BLINK.tsv",)
    release = RELEASES["blink"]


class VStarTask(MultipleChoiceTask):
    name = "vstar"
    files = ("VStarBench.tsv",)
    release = RELEASES["vstar"]


class SatTask(BenchmarkTask):
    """SAT, circular: each option-rotated copy is matched on the whole response only, and a
    question counts when all its copies are right."""

    name = "sat"
    files = ("SAT_circular.tsv",)
    release = RELEASES["sat"]
    circular = True
    judged_as = "circular"

    def verdict(self, item: BenchmarkItem, response: str, chartqa_gold_relative: bool = False) -> Verdict:
        return circular_copy(response, item.options, str(item.answer))

    def figures(self, items: Sequence[BenchmarkItem], hits: Sequence[bool]) -> dict[str, Any]:
        """``accuracy`` and ``categories`` over questions (``questions`` of them), not copies."""
        if not items:
            return {"items": 0.0, "accuracy": math.nan}
        groups = circular_groups(items, hits)
        result: dict[str, Any] = {
            "items": float(len(items)),
            "accuracy": 100 * sum(groups.values()) / len(groups) if groups else math.nan,
            "questions": float(len(groups)),
        }
        return result | category_accuracies((item, groups[item.index]) for item in items if item.index in groups)


class ChartQaTask(BenchmarkTask):
    """ChartQA's bar-chart subsets: relaxed accuracy, reported per file and pooled."""

    name = "chartqa"
    judged_as = "chartqa"
    files = ("ChartQA_h_bar.tsv", "ChartQA_v_bar.tsv")

    def verdict(self, item: BenchmarkItem, response: str, chartqa_gold_relative: bool = False) -> Verdict:
        return chartqa(response, item.answer, gold_relative=chartqa_gold_relative)

    def figures(self, items: Sequence[BenchmarkItem], hits: Sequence[bool]) -> dict[str, Any]:
        """The pooled figures plus one accuracy per file (``ChartQA_h_bar``, ``ChartQA_v_bar``)."""
        result = super().figures(items, hits)
        for stem in (Path(name).stem for name in self.files):
            group = [bool(hit) for item, hit in zip(items, hits) if item.release_part == stem]
            if group:
                result[stem] = 100 * sum(group) / len(group)
        return result


class MmvpTask(MultipleChoiceTask):
    """MMVP: per-question accuracy as the harness reports it, and ``pair_accuracy``."""

    name = "mmvp"
    files = ("MMVP.tsv",)
    release = RELEASES["mmvp"]

    def figures(self, items: Sequence[BenchmarkItem], hits: Sequence[bool]) -> dict[str, Any]:
        result = super().figures(items, hits)
        if items:
            result["pair_accuracy"] = 100 * pair_accuracy({item.index: bool(hit) for item, hit in zip(items, hits)})
        return result


class CvBenchTask(MultipleChoiceTask):
    """CV-Bench: asked with its own ``prompt`` column where rows have one; 2D is the mean of its
    sources' accuracies, 3D plain, ``accuracy`` the mean of the two."""

    name = "cv-bench"
    files = ("CV-Bench-2D.tsv", "CV-Bench-3D.tsv")
    release = RELEASES["cv-bench"]

    def prompt(self, item: BenchmarkItem) -> str:
        return str(item.extra["prompt"]) if item.extra.get("prompt") else multiple_choice_prompt(item)

    def figures(self, items: Sequence[BenchmarkItem], hits: Sequence[bool]) -> dict[str, Any]:
        if not items:
            return {"items": 0.0, "accuracy": math.nan}
        two_d = {item.index: bool(hit) for item, hit in zip(items, hits) if "2D" in item.release_part}
        three_d = [bool(hit) for item, hit in zip(items, hits) if "3D" in item.release_part]
        sources = {item.index: str(item.extra.get("source") or item.category or "all") for item in items}
        result: dict[str, Any] = {"items": float(len(items))}
        if two_d:
            result["2d"] = 100 * mean_of_group_accuracies(two_d, sources)
        if three_d:
            result["3d"] = 100 * sum(three_d) / len(three_d)
        halves = [result[key] for key in ("2d", "3d") if key in result]
        result["accuracy"] = sum(halves) / len(halves) if halves else math.nan
        return result | category_accuracies(zip(items, hits))
