"""The paper's nine benchmarks from local files: readers, prompts, scoring and aggregation.

Owns: where each benchmark's files live under a data root (their VLMEvalKit TSV names, else the
Hugging Face parquet release read by :mod:`opsd_core.evaluation.parquet`), reading those TSVs
(base64 images, list-string multi-image cells, index back-references, option columns), the
normalised :class:`BenchmarkItem`, the prompt each item is asked with (the
VLMEvalKit multiple-choice layout the paper's harness uses), scoring one response, and turning
per-item hits into the number the paper reports (circular groups for SAT, per-source means for
CV-Bench 2D).
Does not know: models, backends or contexts; images are handed over as PIL images.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsd_core.evaluation.answers import extract_choice
from opsd_core.evaluation.scorers import (
    CIRCULAR_OFFSET,
    chartqa_prediction,
    circular_accuracy,
    maze_moves,
    mean_of_group_accuracies,
    pair_accuracy,
    score_chartqa,
    score_vsp,
)

OPTION_LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# A cell this short in the image column is the index of another row whose image it reuses.
BACK_REFERENCE_MAX = 64


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark as the paper reports it.

    Attributes:
        name: the command-line name.
        files: its VLMEvalKit TSV file names under the data root (several are pooled).
        scoring: ``mcq`` (option letters), ``vsp`` (maze simulation) or ``chartqa`` (relaxed accuracy).
        aggregate: ``plain`` (mean hit), ``circular`` (a question counts only if every rotated copy
            is right) or ``cv-bench`` (2D: mean of per-source accuracies; 3D: plain; the two
            averaged).
    """

    name: str
    files: tuple[str, ...]
    scoring: str = "mcq"
    aggregate: str = "plain"


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("vsp", ("VSP_maze_task_main_original.tsv",), scoring="vsp"),
        BenchmarkSpec("vispuzzle", ("VisPuzzle.tsv",)),
        BenchmarkSpec("blink-jigsaw", ("BLINK_Jigsaw.tsv",)),
        BenchmarkSpec("sat", ("SAT_circular.tsv",), aggregate="circular"),
        BenchmarkSpec("blink", ("BLINK.tsv",)),
        BenchmarkSpec("chartqa", ("ChartQA_h_bar.tsv", "ChartQA_v_bar.tsv"), scoring="chartqa"),
        BenchmarkSpec("vstar", ("VStarBench.tsv",)),
        BenchmarkSpec("mmvp", ("MMVP.tsv",)),
        BenchmarkSpec("cv-bench", ("CV-Bench-2D.tsv", "CV-Bench-3D.tsv"), aggregate="cv-bench"),
    )
}


@dataclass(frozen=True)
class BenchmarkItem:
    """One question of a benchmark, normalised.

    Attributes:
        benchmark: the benchmark's name.
        index: the row's ``index`` column (unique within the benchmark's pooled files).
        source_file: the file it came from (a TSV, or a parquet shard relative to the data root).
        images: PIL images, in order.
        question: the question text as stored.
        options: option letter -> text, for multiple-choice rows.
        answer: the gold answer (a letter, a number or a short string; ChartQA may list several).
        hint: the ``hint`` column, if any.
        category: the ``category`` column, if any.
        extra: other columns (``maze_map``, ``source``, ``split``, ...).
        part: the VLMEvalKit file stem the row belongs to (``CV-Bench-2D``, ``ChartQA_h_bar``):
            the unit of the per-part figures, whichever format the row was read from. Defaults
            to the stem of ``source_file``.
    """

    benchmark: str
    index: int
    source_file: str
    images: tuple[Any, ...]
    question: str
    options: Mapping[str, str]
    answer: Any
    hint: str | None = None
    category: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    part: str | None = None

    @property
    def id(self) -> str:
        return f"{self.benchmark}/{self.index}"

    @property
    def release_part(self) -> str:
        return self.part or Path(self.source_file).stem


# ---------------------------------------------------------------------------------------------- reading
def benchmark_names(text: str | Iterable[str]) -> list[str]:
    """Benchmark names from ``vsp,chartqa`` (or ``all``), checked against :data:`BENCHMARKS`."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if names == ["all"]:
        return list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark(s) {unknown or names}; known: {', '.join(BENCHMARKS)} (or 'all')")
    return names


def benchmark_files(spec: BenchmarkSpec, data_root: Path) -> list[Path]:
    """The TSV files of ``spec`` under ``data_root``; a missing one is an error naming what belongs there."""
    paths = [Path(data_root) / name for name in spec.files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"benchmark {spec.name!r} needs {', '.join(spec.files)} in {data_root} (the VLMEvalKit TSV files); "
            f"missing: {', '.join(str(p) for p in missing)}"
        )
    return paths


def decode_image(cell: str) -> Any:
    """A PIL RGB image from a base64 cell."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(cell))).convert("RGB")


def _is_missing(value: str | None) -> bool:
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def _parse_answer(value: str) -> Any:
    """A list answer stored as a Python-list string (ChartQA) becomes a list; else the string."""
    stripped = value.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            parsed = ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
            return stripped
        if isinstance(parsed, list):
            return [str(item) for item in parsed]
    return stripped


def read_tsv(path: Path, benchmark: str) -> list[BenchmarkItem]:
    """Every row of a VLMEvalKit TSV as items (images decoded, back-references resolved)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if rows and ("index" not in rows[0] or "question" not in rows[0]):
        raise ValueError(f"{path}: a VLMEvalKit TSV needs the columns index, question, image (got {list(rows[0])})")
    cells = {row["index"].strip(): row.get("image") or "" for row in rows}
    known = {"index", "image", "image_path", "question", "answer", "hint", "category", *OPTION_LETTERS}
    items = []
    for row in rows:
        images = tuple(decode_image(cell) for cell in _image_cells(row.get("image") or "", cells, path))
        options = {
            letter: row[letter].strip() for letter in OPTION_LETTERS if letter in row and not _is_missing(row[letter])
        }
        items.append(
            BenchmarkItem(
                benchmark=benchmark,
                index=int(float(row["index"])),
                source_file=path.name,
                images=images,
                question=row["question"],
                options=options,
                answer=_parse_answer(row.get("answer") or ""),
                hint=None if _is_missing(row.get("hint")) else row["hint"],
                category=None if _is_missing(row.get("category")) else row["category"],
                extra={k: v for k, v in row.items() if k not in known and not _is_missing(v)},
                part=path.stem,
            )
        )
    return items


def _image_cells(cell: str, cells: Mapping[str, str], path: Path, depth: int = 0) -> list[str]:
    """The base64 strings of an image cell: one, a list-string of several, or a back-reference."""
    cell = cell.strip()
    if not cell:
        return []
    if cell.startswith("["):
        return [c for item in ast.literal_eval(cell) for c in _image_cells(str(item), cells, path, depth)]
    if len(cell) <= BACK_REFERENCE_MAX:
        if depth > 4 or cell not in cells:
            raise ValueError(f"{path}: image cell {cell!r} is neither base64 nor the index of another row")
        return _image_cells(cells[cell], cells, path, depth + 1)
    return [cell]


def load_benchmark(name: str, data_root: Path, limit: int | None = None) -> list[BenchmarkItem]:
    """The items of benchmark ``name``, the first ``limit`` if given.

    The VLMEvalKit TSV files come first (pooled, in file order). Where none of them is under
    ``data_root`` but the benchmark's Hugging Face parquet release is (see
    :data:`opsd_core.evaluation.parquet.RELEASES`), the parquet rows are read instead.
    """
    from opsd_core.evaluation import parquet

    spec = BENCHMARKS[name]
    release = parquet.RELEASES.get(name)
    tsv_absent = not any((Path(data_root) / file).is_file() for file in spec.files)
    if tsv_absent and release is not None and release.present(Path(data_root)):
        items = release.read(Path(data_root), name)
    else:
        try:
            paths = benchmark_files(spec, data_root)
        except FileNotFoundError as error:
            if tsv_absent:
                raise FileNotFoundError(f"{error}; {parquet.where(name, Path(data_root))}") from None
            raise
        items = [item for path in paths for item in read_tsv(path, name)]
    seen: set[int] = set()
    for item in items:
        if item.index in seen:
            raise ValueError(f"benchmark {name!r}: index {item.index} appears twice (in {item.source_file})")
        seen.add(item.index)
    return items[:limit] if limit is not None else items


# ---------------------------------------------------------------------------------------------- prompts
def prompt(item: BenchmarkItem) -> str:
    """The question as the paper's harness asks it.

    Multiple-choice rows: ``Hint: …`` (if any), ``Question: …``, ``Options:`` one ``X. text`` per
    line, then ``Please select the correct answer from the options above.``; other rows: the
    question as stored (VSP's and ChartQA's questions carry their own instructions).
    """
    if not item.options:
        return item.question
    lines = [f"Hint: {item.hint}"] if item.hint else []
    lines.append(f"Question: {item.question}")
    lines.append("Options:")
    lines += [f"{letter}. {text}" for letter, text in item.options.items()]
    lines.append("Please select the correct answer from the options above. ")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- scoring
def score(item: BenchmarkItem, response: str, chartqa_swapped: bool = False) -> tuple[bool, str | None]:
    """(hit, extracted answer) of ``response`` to ``item`` under its benchmark's rules."""
    spec = BENCHMARKS[item.benchmark]
    if spec.scoring == "vsp":
        maze = item.extra.get("maze_map")
        if maze is None:
            raise ValueError(f"{item.id}: a VSP row needs its maze_map column")
        rows = ast.literal_eval(maze) if isinstance(maze, str) and maze.strip().startswith("[") else str(maze).split()
        moves = maze_moves(response)
        return score_vsp(response, rows), None if moves is None else ",".join(moves)
    if spec.scoring == "chartqa":
        return score_chartqa(response, item.answer, swapped=chartqa_swapped), chartqa_prediction(response)
    choice = extract_choice(response, item.options)
    return choice is not None and choice == str(item.answer).strip().strip("()"), choice


def aggregate(spec: BenchmarkSpec, items: Sequence[BenchmarkItem], hits: Sequence[bool]) -> dict[str, float]:
    """The benchmark's reported accuracy (0-100) plus its breakdown.

    ``accuracy`` is what the paper reports; ``items`` the rows scored; extra keys per rule:
    SAT ``questions`` (circular groups); CV-Bench ``2d`` / ``3d``; MMVP ``pair_accuracy``;
    ChartQA one accuracy per file.
    """
    by_index = {item.index: bool(hit) for item, hit in zip(items, hits)}
    result: dict[str, float] = {"items": float(len(items))}
    if not items:
        return result | {"accuracy": math.nan}
    if spec.aggregate == "circular":
        result["accuracy"] = 100 * circular_accuracy(by_index)
        result["questions"] = float(len({i % CIRCULAR_OFFSET for i in by_index}))
    elif spec.aggregate == "cv-bench":
        parts = defaultdict(dict)
        for item, hit in zip(items, hits):
            parts[item.release_part][item.index] = bool(hit)
        two_d = {i: h for name, group in parts.items() if "2D" in name for i, h in group.items()}
        three_d = {i: h for name, group in parts.items() if "3D" in name for i, h in group.items()}
        sources = {item.index: str(item.extra.get("source") or item.category or "all") for item in items}
        values = []
        if two_d:
            result["2d"] = 100 * mean_of_group_accuracies(two_d, sources)
            values.append(result["2d"])
        if three_d:
            result["3d"] = 100 * sum(three_d.values()) / len(three_d)
            values.append(result["3d"])
        result["accuracy"] = sum(values) / len(values)
    else:
        result["accuracy"] = 100 * sum(by_index.values()) / len(by_index)
    if spec.name == "mmvp":
        result["pair_accuracy"] = 100 * pair_accuracy(by_index)
    if spec.name == "chartqa":
        for name in spec.files:
            group = [hit for item, hit in zip(items, hits) if item.release_part == Path(name).stem]
            if group:
                result[Path(name).stem] = 100 * sum(group) / len(group)
    return result
