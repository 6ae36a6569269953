"""Benchmarks as evaluation-only tasks: the base class a benchmark plugin fills in, and the
machinery it shares: reading VLMEvalKit TSVs, falling back to a Hugging Face parquet release,
the harness's multiple-choice prompt, circular groups and per-category accuracies.

Owns: :class:`BenchmarkTask` (what a benchmark declares: its TSV files and columns, its parquet
release, its prompt, which harness rule of :mod:`opsd_core.evaluation.rules` scores it and the
figures it reports), reading TSVs (base64 images, list-string multi-image cells, index
back-references, option columns rendered as the harness's table reader renders them), loading a
benchmark's items from a data root (TSVs first, else its parquet release, indices unique), and
finding the benchmark tasks the installed plugins register. Unreadable input raises
:class:`~opsd_core.evaluation.items.BenchmarkDataError` naming the file, the row and the problem.
Does not know: any particular benchmark (the paper's nine are the ``opsd-benchmarks`` plugin's),
models, backends or contexts; images are handed over as PIL images.
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
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from opsd_core.errors import ConfigError, PluginError, UnknownNameError
from opsd_core.evaluation import rules
from opsd_core.evaluation.items import OPTION_LETTERS, BenchmarkDataError, BenchmarkFileMissing, BenchmarkItem
from opsd_core.evaluation.parquet import ParquetRelease
from opsd_core.evaluation.scorers import CIRCULAR_OFFSET
from opsd_core.interfaces import Task
from opsd_core.types import Problem, Score

__all__ = ["OPTION_LETTERS", "BenchmarkItem", "BenchmarkTask", "benchmark_names", "benchmark_tasks",
           "category_accuracies", "circular_groups", "load_benchmark", "multiple_choice_prompt", "read_tsv"]

# A cell this short in the image column is the index of another row whose image it reuses.
BACK_REFERENCE_MAX = 64
TSV_COLUMNS = ("index", "image", "question", "answer")


class BenchmarkTask(Task):
    """A benchmark of local files, as a task that only evaluates (``trains`` is False).

    A benchmark plugin subclasses it once per benchmark, sets the class attributes and
    implements :meth:`verdict`; :meth:`prompt` and :meth:`figures` have the harness's common
    forms. The evaluation machinery (``opsd eval --benchmarks``, ``[eval] benchmarks`` during
    training) calls :meth:`items`, :meth:`prompt`, :meth:`verdict` and :meth:`figures`; the
    :class:`~opsd_core.interfaces.Task` methods serve a config whose ``[task]`` names the
    benchmark (``opsd eval`` of the student, teacher and noise contexts), reading the params'
    ``data_root``; there a problem carries an item's first image only (the Task role's problems
    hold one).

    Attributes:
        name: the registry name (``vsp``, ``cv-bench``).
        files: its VLMEvalKit TSV file names under the data root (several are pooled, in order).
        columns: TSV columns its rows need besides index, image, question and answer.
        integer_columns: columns whose cells must be integers, stored as ``int`` in ``extra``.
        release: its Hugging Face parquet release, read where none of ``files`` is there.
        circular: whether its rows are option-rotated copies of questions (index + k * 1e6);
            each scored record then says whether the whole question is right.
        judged_as: where the paper's harness asks its LLM judge for this benchmark (``opsd eval
            --judge``): ``mcq``, ``circular``, ``chartqa`` or ``none`` (never asked; see
            :func:`opsd_core.evaluation.judge_rules.judge_items`).
    """

    trains: ClassVar[bool] = False
    name: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()
    columns: ClassVar[tuple[str, ...]] = ()
    integer_columns: ClassVar[tuple[str, ...]] = ()
    release: ClassVar[ParquetRelease | None] = None
    circular: ClassVar[bool] = False
    judged_as: ClassVar[str] = "none"

    def __init__(self, params: Any = None):
        root = getattr(params, "data_root", None)
        self.data_root = Path(root) if root else None
        self._items: dict[str, BenchmarkItem] = {}

    # ------------------------------------------------------------------ what a benchmark declares
    def items(self, data_root: Path, limit: int | None = None) -> list[BenchmarkItem]:
        """The benchmark's items under ``data_root``, the first ``limit`` if given (see :func:`load_items`)."""
        return load_items(self, Path(data_root), limit)

    def prompt(self, item: BenchmarkItem) -> str:
        """The text ``item`` is asked with: the harness's multiple-choice layout for rows with
        options, else the question as stored (:func:`multiple_choice_prompt`)."""
        return multiple_choice_prompt(item)

    @abstractmethod
    def verdict(self, item: BenchmarkItem, response: str, chartqa_gold_relative: bool = False) -> rules.Verdict:
        """How ``response`` to ``item`` scores under the benchmark's harness rule
        (``chartqa_gold_relative``: the named ChartQA option, see docs/scoring.md)."""

    def figures(self, items: Sequence[BenchmarkItem], hits: Sequence[bool]) -> dict[str, Any]:
        """The reported ``accuracy`` (0-100), ``items``, and ``categories`` where rows have one:
        the harness's plain mean hit. A benchmark whose figure is not a mean overrides it."""
        if not items:
            return {"items": 0.0, "accuracy": math.nan}
        result: dict[str, Any] = {"items": float(len(items)), "accuracy": 100 * sum(map(bool, hits)) / len(items)}
        return result | category_accuracies(zip(items, hits))

    # ------------------------------------------------------------------ the Task role
    def eval_problems(self, limit: int | None = None) -> Sequence[Problem]:
        if self.data_root is None:
            raise ConfigError(f"task.data_root: benchmark {self.name!r} needs the directory of its files")
        problems = []
        for item in self.items(self.data_root, limit):
            self._items[item.id] = item
            problems.append(Problem(item.id, item.images[0], self.prompt(item)))
        return problems

    def score(self, problem: Problem, response: str) -> Score:
        verdict = self.verdict(self._item(problem), response)
        return Score(verdict.hit, float(verdict.hit), verdict.extracted)

    def aggregate(self, problems: Sequence[Problem], scores: Sequence[Score]) -> dict[str, float]:
        """The scalar :meth:`figures` as fractions (percentages divided by 100; counts kept)."""
        figures = self.figures([self._item(problem) for problem in problems], [score.correct for score in scores])
        return {
            key: value if key in ("items", "questions") else value / 100
            for key, value in figures.items()
            if isinstance(value, float)
        }

    def _item(self, problem: Problem) -> BenchmarkItem:
        try:
            return self._items[problem.id]
        except KeyError:
            raise BenchmarkDataError(f"benchmark {self.name!r}: problem {problem.id!r} is not one of its items") from None


# ---------------------------------------------------------------------------------------------- finding them
def benchmark_tasks(names: str | Iterable[str], registries: Any = None) -> dict[str, BenchmarkTask]:
    """Name -> task of the benchmarks ``vsp,chartqa`` (or ``all``: every one registered), from
    the installed plugins' tasks. An unknown name raises :class:`~opsd_core.errors.UnknownNameError`
    (the benchmarks listed, the closest suggested); a task that is not a benchmark, a
    :class:`~opsd_core.errors.ConfigError` listing the benchmarks."""
    from opsd_core import plugins

    registry = (registries or plugins.get_registries()).task
    chosen = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    entries = benchmark_entries(registry)
    known = [entry.name for entry in entries]
    if not known:
        raise ConfigError("no benchmark task is installed; install one, e.g. pip install ./plugins/opsd-benchmarks")
    if not chosen:
        raise ConfigError(f"no benchmark named; known benchmarks: {', '.join(known)} (or 'all')")
    if chosen == ["all"]:
        return {entry.name: entry.resolve()() for entry in entries}
    tasks = {}
    for name in chosen:
        if name not in registry:
            raise UnknownNameError("benchmark", name, known)
        factory = registry.get(name).resolve()
        if not (isinstance(factory, type) and issubclass(factory, BenchmarkTask)):
            raise ConfigError(f"task {name!r} is not a benchmark; known benchmarks: {', '.join(known)}")
        tasks[name] = factory()
    return tasks


def benchmark_names(names: str | Iterable[str], registries: Any = None) -> list[str]:
    """The benchmark names of ``vsp,chartqa`` (or ``all``), checked as :func:`benchmark_tasks` checks them."""
    return list(benchmark_tasks(names, registries))


def benchmark_entries(registry: Any) -> list[Any]:
    """The task registry's entries whose factory is a :class:`BenchmarkTask` (a task whose
    module cannot be imported here is not one)."""
    found = []
    for entry in registry:
        try:
            factory = entry.resolve()
        except PluginError:
            continue
        if isinstance(factory, type) and issubclass(factory, BenchmarkTask):
            found.append(entry)
    return found


def load_benchmark(name: str, data_root: Path, limit: int | None = None) -> list[BenchmarkItem]:
    """The items of the installed benchmark ``name`` under ``data_root``, the first ``limit`` if given."""
    return benchmark_tasks([name])[name].items(data_root, limit)


# ---------------------------------------------------------------------------------------------- reading
def benchmark_files(task: BenchmarkTask, data_root: Path) -> list[Path]:
    """The TSV files of ``task`` under ``data_root``; a missing one is an error naming what belongs there."""
    paths = [Path(data_root) / name for name in task.files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BenchmarkFileMissing(
            f"benchmark {task.name!r} needs {', '.join(task.files)} in {data_root} (the VLMEvalKit TSV files); "
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
    if not rows:
        raise BenchmarkDataError(f"{path}: the header is there but no row follows; the benchmark would score nothing")
    return rows


def read_tsv(
    path: Path, benchmark: str, columns: Sequence[str] = (), integer_columns: Sequence[str] = ()
) -> list[BenchmarkItem]:
    """Every row of a VLMEvalKit TSV as items of ``benchmark`` (images decoded, back-references resolved).

    ``columns`` are needed besides index, image, question and answer; each of
    ``integer_columns`` must hold an integer, stored as ``int`` in ``extra``. Option, answer,
    integer, hint and category cells are rendered column by column as the harness's table
    reader renders them (:func:`opsd_core.evaluation.rules.render_column`), so a prompt shows and
    the scorer matches ``6.0`` where the harness does.
    """
    path = Path(path)
    rows = _read_rows(path, (*TSV_COLUMNS, *columns, *integer_columns))
    rendered = {
        column: rules.render_column([row[column] for row in rows])
        for column in dict.fromkeys((*OPTION_LETTERS, "answer", *integer_columns, "hint", "category"))
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
        for column in integer_columns:
            cell = value.get(column)
            if cell is None or not cell.isdigit():
                raise problem(f"expected an integer, got {row[column]!r}", column)
            extra[column] = int(cell)
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


def load_items(task: BenchmarkTask, data_root: Path, limit: int | None = None) -> list[BenchmarkItem]:
    """The items of ``task`` under ``data_root``, the first ``limit`` if given.

    The VLMEvalKit TSV files come first (pooled, in file order). Where none of them is under
    ``data_root`` but the benchmark's parquet release is (:attr:`BenchmarkTask.release`), the
    parquet rows are read instead.
    """
    root = Path(data_root)
    release = task.release
    tsv_absent = not any((root / file).is_file() for file in task.files)
    if tsv_absent and release is not None and release.present(root):
        items = release.read(root, task.name)
    else:
        try:
            paths = benchmark_files(task, root)
        except BenchmarkFileMissing as error:
            if tsv_absent:
                elsewhere = (
                    f"or its Hugging Face parquet release as {root / release.location()}" if release is not None
                    else f"{task.name!r} has no parquet release that can stand in for the TSV files"
                )
                raise BenchmarkFileMissing(f"{error}; {elsewhere}") from None
            raise
        items = [item for path in paths for item in read_tsv(path, task.name, task.columns, task.integer_columns)]
    first_seen: dict[int, str] = {}
    for item in items:
        if item.index in first_seen:
            raise BenchmarkDataError(
                f"benchmark {task.name!r}: index {item.index} appears twice (in {first_seen[item.index]} and "
                f"{item.source_file}); each row needs its own index"
            )
        first_seen[item.index] = item.source_file
    return items[:limit] if limit is not None else items


# ---------------------------------------------------------------------------------------------- prompts and figures
def multiple_choice_prompt(item: BenchmarkItem) -> str:
    """The question as the paper's harness asks it.

    Multiple-choice rows: ``Hint: …`` (if any), ``Question: …``, ``Options:`` one ``X. text``
    per line, then ``Please select the correct answer from the options above.``; other rows:
    the question as stored (VSP's and ChartQA's questions carry their own instructions).
    """
    if not item.options:
        return item.question
    lines = [f"Hint: {item.hint}"] if item.hint else []
    lines.append(f"Question: {item.question}")
    lines.append("Options:")
    lines += [f"{letter}. {text}" for letter, text in item.options.items()]
    lines.append("Please select the correct answer from the options above. ")
    return "\n".join(lines) + "\n"


def circular_groups(items: Sequence[BenchmarkItem], hits: Sequence[bool]) -> dict[int, bool]:
    """Question index -> whether every option-rotated copy (index + k * 1e6) is right; only
    questions whose own row (index < 1e6) is among ``items`` count."""
    groups: dict[int, bool] = {item.index: True for item in items if item.index < CIRCULAR_OFFSET}
    for item, hit in zip(items, hits):
        key = item.index % CIRCULAR_OFFSET
        if key in groups:
            groups[key] = groups[key] and bool(hit)
    return groups


def category_accuracies(scored: Iterable[tuple[BenchmarkItem, bool]]) -> dict[str, Any]:
    """``{"categories": {category: accuracy (0-100)}}`` over the items that have a category,
    sorted by name (the harness's per-category report); empty when none has one."""
    categories: dict[str, list[bool]] = defaultdict(list)
    for item, hit in scored:
        if item.category:
            categories[item.category].append(bool(hit))
    if not categories:
        return {}
    return {"categories": {c: 100 * sum(h) / len(h) for c, h in sorted(categories.items())}}
