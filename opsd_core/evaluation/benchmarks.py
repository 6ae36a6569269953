"""The paper's nine benchmarks from local files: readers, prompts, scoring and aggregation.

Owns: where each benchmark's files live under a data root (their VLMEvalKit TSV names, else the
Hugging Face parquet release read by :mod:`opsd_core.evaluation.parquet`), reading those TSVs
(base64 images, list-string multi-image cells, index back-references, option columns rendered
as the harness's table reader renders them), the prompt each item is asked with (the VLMEvalKit
multiple-choice layout the paper's harness uses), which harness rule of
:mod:`opsd_core.evaluation.rules` scores each benchmark, and turning per-item hits into the
figures the harness reports (circular groups for SAT, per-source means for CV-Bench 2D,
per-file ChartQA, categories). Unreadable input raises
:class:`~opsd_core.evaluation.items.BenchmarkDataError` naming the file, the row and the problem.
Does not know: models, backends or contexts; images are handed over as PIL images.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsd_core.evaluation import parquet, rules
from opsd_core.evaluation.items import OPTION_LETTERS, BenchmarkDataError, BenchmarkFileMissing, BenchmarkItem
from opsd_core.evaluation.scorers import CIRCULAR_OFFSET, mean_of_group_accuracies, pair_accuracy

__all__ = ["BENCHMARKS", "OPTION_LETTERS", "BenchmarkItem", "BenchmarkSpec", "aggregate", "benchmark_names",
           "load_benchmark", "prompt", "read_tsv", "score"]

# A cell this short in the image column is the index of another row whose image it reuses.
BACK_REFERENCE_MAX = 64
TSV_COLUMNS = ("index", "image", "question", "answer")


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark as the paper reports it.

    Attributes:
        name: the command-line name.
        files: its VLMEvalKit TSV file names under the data root (several are pooled).
        scoring: ``mcq`` (option letters), ``circular`` (option letters of the whole response,
            every rotated copy of a question right), ``vsp`` (maze walk) or ``chartqa``
            (relaxed accuracy).
        aggregate: ``plain`` (mean hit), ``circular`` (a question counts only if every rotated copy
            is right) or ``cv-bench`` (2D: mean of per-source accuracies; 3D: plain; the two
            averaged).
        columns: TSV columns its rows need besides index, image, question and answer.
    """

    name: str
    files: tuple[str, ...]
    scoring: str = "mcq"
    aggregate: str = "plain"
    columns: tuple[str, ...] = ()


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("vsp", ("VSP_maze_task_main_original.tsv",), scoring="vsp", columns=("maze_map", "maze_size")),
        BenchmarkSpec("vispuzzle", ("VisPuzzle.tsv",)),
        BenchmarkSpec("blink-jigsaw", ("BLINK_Jigsaw.tsv",)),
        BenchmarkSpec("sat", ("SAT_circular.tsv",), scoring="circular", aggregate="circular"),
        BenchmarkSpec("blink", ("BLINK.tsv",)),
        BenchmarkSpec("chartqa", ("ChartQA_h_bar.tsv", "ChartQA_v_bar.tsv"), scoring="chartqa"),
        BenchmarkSpec("vstar", ("VStarBench.tsv",)),
        BenchmarkSpec("mmvp", ("MMVP.tsv",)),
        BenchmarkSpec("cv-bench", ("CV-Bench-2D.tsv", "CV-Bench-3D.tsv"), aggregate="cv-bench"),
    )
}


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
        raise BenchmarkFileMissing(
            f"benchmark {spec.name!r} needs {', '.join(spec.files)} in {data_root} (the VLMEvalKit TSV files); "
            f"missing: {', '.join(str(p) for p in missing)}"
        )
    return paths


def decode_image(cell: str) -> Any:
    """A PIL RGB image from a base64 cell (raises ValueError when it is not one)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(base64.b64decode(cell, validate=True))).convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise ValueError(f"not a base64-encoded image ({error})") from None


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


def _read_rows(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a TSV with ``columns`` present and every row of the header's width."""
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            header = reader.fieldnames
            rows = []
            for number, row in enumerate(reader, start=1):
                if None in row or None in row.values():
                    raise BenchmarkDataError(
                        f"{path}, row {number} (line {reader.line_num}): {len(row) - (None in row)} header columns "
                        f"but a different number of tab-separated cells"
                    )
                rows.append(row)
    except UnicodeDecodeError as error:
        raise BenchmarkDataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise BenchmarkDataError(f"{path}: not a readable TSV ({error})") from None
    if not header:
        raise BenchmarkDataError(f"{path}: the file is empty; a VLMEvalKit TSV starts with a header row")
    absent = [column for column in columns if column not in header]
    if absent:
        raise BenchmarkDataError(
            f"{path}: column {absent[0]!r} is missing; this benchmark's TSV needs {', '.join(columns)} "
            f"(the header has {', '.join(header)})"
        )
    return rows


def read_tsv(path: Path, benchmark: str) -> list[BenchmarkItem]:
    """Every row of a VLMEvalKit TSV as items (images decoded, back-references resolved).

    Option, answer and ``maze_size`` cells are rendered column by column as the harness's table
    reader renders them (:func:`opsd_core.evaluation.rules.render_column`), so a prompt shows and
    the scorer matches ``6.0`` where the harness does.
    """
    path = Path(path)
    spec = BENCHMARKS.get(benchmark)
    rows = _read_rows(path, TSV_COLUMNS + (spec.columns if spec else ()))
    rendered = {
        column: rules.render_column([row[column] for row in rows])
        for column in (*OPTION_LETTERS, "answer", "maze_size", "hint", "category")
        if rows and column in rows[0]
    }
    cells = {row["index"].strip(): row["image"] for row in rows}
    known = {"index", "image", "image_path", "question", "answer", "hint", "category", *OPTION_LETTERS}
    items = []
    for number, row in enumerate(rows, start=1):
        def problem(message: str, column: str | None = None) -> BenchmarkDataError:
            place = f", column {column!r}" if column else ""
            return BenchmarkDataError(f"{path}, row {number} (index {row['index'].strip() or '?'}){place}: {message}")

        try:
            index = int(row["index"].strip())
        except ValueError:
            raise problem(f"the index {row['index']!r} is not an integer", "index") from None
        try:
            images = tuple(decode_image(cell) for cell in _image_cells(row["image"], cells))
        except ValueError as error:
            raise problem(str(error), "image") from None
        if not images:
            raise problem("the image cell is empty", "image")
        value = {column: values[number - 1] for column, values in rendered.items()}
        if value["answer"] is None:
            raise problem("the answer cell is empty", "answer")
        extra = {k: v for k, v in row.items() if k not in known and v not in rules.MISSING_CELLS}
        if spec is not None and spec.scoring == "vsp":
            size = value.get("maze_size")
            if size is None or not size.isdigit():
                raise problem(f"expected the maze's side as an integer, got {row['maze_size']!r}", "maze_size")
            extra["maze_size"] = int(size)
        items.append(
            BenchmarkItem(
                benchmark=benchmark,
                index=index,
                source_file=path.name,
                images=images,
                question=row["question"],
                options={letter: value[letter] for letter in OPTION_LETTERS if value.get(letter) is not None},
                answer=_parse_answer(value["answer"]),
                hint=value.get("hint"),
                category=value.get("category"),
                extra=extra,
                part=path.stem,
            )
        )
    return items


def _image_cells(cell: str, cells: Mapping[str, str], depth: int = 0) -> list[str]:
    """The base64 strings of an image cell: one, a list-string of several, or a back-reference."""
    cell = cell.strip()
    if not cell:
        return []
    if cell.startswith("["):
        try:
            listed = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            raise ValueError("a list of images that is not a Python list of strings") from None
        return [c for item in listed for c in _image_cells(str(item), cells, depth)]
    if len(cell) <= BACK_REFERENCE_MAX:
        if depth > 4 or cell not in cells:
            raise ValueError(f"image cell {cell!r} is neither base64 nor the index of another row")
        return _image_cells(cells[cell], cells, depth + 1)
    return [cell]


def load_benchmark(name: str, data_root: Path, limit: int | None = None) -> list[BenchmarkItem]:
    """The items of benchmark ``name``, the first ``limit`` if given.

    The VLMEvalKit TSV files come first (pooled, in file order). Where none of them is under
    ``data_root`` but the benchmark's Hugging Face parquet release is (see
    :data:`opsd_core.evaluation.parquet.RELEASES`), the parquet rows are read instead.
    """
    spec = BENCHMARKS[name]
    release = parquet.RELEASES.get(name)
    tsv_absent = not any((Path(data_root) / file).is_file() for file in spec.files)
    if tsv_absent and release is not None and release.present(Path(data_root)):
        items = release.read(Path(data_root), name)
    else:
        try:
            paths = benchmark_files(spec, data_root)
        except BenchmarkFileMissing as error:
            if tsv_absent:
                raise BenchmarkFileMissing(f"{error}; {parquet.where(name, Path(data_root))}") from None
            raise
        items = [item for path in paths for item in read_tsv(path, name)]
    first_seen: dict[int, str] = {}
    for item in items:
        if item.index in first_seen:
            raise BenchmarkDataError(
                f"benchmark {name!r}: index {item.index} appears twice (in {first_seen[item.index]} and "
                f"{item.source_file}); each row needs its own index"
            )
        first_seen[item.index] = item.source_file
    return items[:limit] if limit is not None else items


# ---------------------------------------------------------------------------------------------- prompts
def prompt(item: BenchmarkItem) -> str:
    """The question as the paper's harness asks it.

    CV-Bench rows with a ``prompt`` column: that column (the harness asks the dataset's own
    prompt). Multiple-choice rows: ``Hint: …`` (if any), ``Question: …``, ``Options:`` one
    ``X. text`` per line, then ``Please select the correct answer from the options above.``;
    other rows: the question as stored (VSP's and ChartQA's questions carry their own
    instructions).
    """
    if item.benchmark == "cv-bench" and item.extra.get("prompt"):
        return str(item.extra["prompt"])
    if not item.options:
        return item.question
    lines = [f"Hint: {item.hint}"] if item.hint else []
    lines.append(f"Question: {item.question}")
    lines.append("Options:")
    lines += [f"{letter}. {text}" for letter, text in item.options.items()]
    lines.append("Please select the correct answer from the options above. ")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- scoring
def score(item: BenchmarkItem, response: str, chartqa_gold_relative: bool = False) -> rules.Verdict:
    """How ``response`` to ``item`` scores under its benchmark's harness rule."""
    spec = BENCHMARKS[item.benchmark]
    if spec.scoring == "vsp":
        maze = item.extra.get("maze_map")
        if maze is None:
            raise BenchmarkDataError(f"{item.source_file}, index {item.index}: a VSP row needs its maze_map column")
        rows = rules.maze_rows(str(maze))
        return rules.vsp(response, str(maze), int(item.extra.get("maze_size") or len(rows)))
    if spec.scoring == "chartqa":
        return rules.chartqa(response, item.answer, gold_relative=chartqa_gold_relative)
    gold = str(item.answer)
    if spec.scoring == "circular":
        return rules.circular_copy(response, item.options, gold)
    return rules.multiple_choice(response, item.options, gold)


def circular_groups(items: Sequence[BenchmarkItem], hits: Sequence[bool]) -> dict[int, bool]:
    """Question index -> whether every option-rotated copy (index + k * 1e6) is right; only
    questions whose own row (index < 1e6) is among ``items`` count."""
    groups: dict[int, bool] = {item.index: True for item in items if item.index < CIRCULAR_OFFSET}
    for item, hit in zip(items, hits):
        key = item.index % CIRCULAR_OFFSET
        if key in groups:
            groups[key] = groups[key] and bool(hit)
    return groups


def aggregate(spec: BenchmarkSpec, items: Sequence[BenchmarkItem], hits: Sequence[bool]) -> dict[str, Any]:
    """The benchmark's reported accuracy (0-100) plus its breakdown, as the harness reports it.

    ``accuracy`` is what the paper reports; ``items`` the rows scored; extra keys per rule:
    SAT ``questions`` (circular groups); CV-Bench ``2d`` / ``3d``; MMVP ``pair_accuracy``;
    ChartQA one accuracy per file; ``categories`` the accuracy within each ``category`` value
    (SAT: of the questions' groups).
    """
    by_index = {item.index: bool(hit) for item, hit in zip(items, hits)}
    result: dict[str, Any] = {"items": float(len(items))}
    if not items:
        return result | {"accuracy": math.nan}
    scored: list[tuple[BenchmarkItem, bool]] = list(zip(items, map(bool, hits)))
    if spec.aggregate == "circular":
        groups = circular_groups(items, hits)
        result["accuracy"] = 100 * sum(groups.values()) / len(groups) if groups else math.nan
        result["questions"] = float(len(groups))
        scored = [(item, groups[item.index]) for item in items if item.index in groups]
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
    categories: dict[str, list[bool]] = defaultdict(list)
    for item, hit in scored:
        if item.category:
            categories[item.category].append(hit)
    if categories:
        result["categories"] = {c: 100 * sum(h) / len(h) for c, h in sorted(categories.items())}
    return result
