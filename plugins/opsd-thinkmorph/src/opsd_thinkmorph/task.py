"""ThinkMorph's training data as an opsd task: problems with a stored visual thought, read
lazily from the released parquet files, and a scorer for their answers.

Owns: finding the parquet files, enumerating (file, row) pairs from parquet metadata alone,
the held-out evaluation split, the order of the training stream and what a resume position
means, decoding a row (images, thought texts) and scoring a response against the row's answer.
Does not know: models, tokenizers, contexts, prompt texts or image resizing (the backend
preprocesses images); the trace's format comes from :mod:`opsd_thinkmorph.prompts`.

Data layout, as on the hub: ``<root>/<Task>/data/train-00000-of-0000N.parquet`` with columns
``pid``, ``question``, ``answer``, ``problem_image_0`` and ``reasoning_image_0`` (image structs
``{bytes, path}``), ``resoning_thought_0``/``resoning_thought_1`` (sic, "resoning"), ``task``
and ``full_text_only_thought``: the text-only reasoning, which with the answer becomes the
problem's reference trace (the SFT control's target, in ThinkMorph's ``<think>...</think>
<answer>...</answer>`` format); a file without that column, or a row whose cell is empty, gives
problems without one.

Row selection, as in the paper's code: each dataset contributes its first ``num_used`` rows in
file-name and row order; a row whose question or answer is empty (after stripping whitespace)
or that has no thought text is skipped. Unlike the paper's code, ids are ``<dataset>/<pid>``
(pids repeat across datasets), and row counts come from parquet footers instead of reading
every table.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import random
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from opsd_core.api import ConfigError, Problem, Score, Task
from opsd_core.api.scoring import answer_tag, boxed, extract_choice, infer_option, relaxed_correct
from opsd_thinkmorph.prompts import text_only_trace
from opsd_thinkmorph.task_params import ThinkMorphDataParams

REQUIRED_COLUMNS = ("pid", "question", "answer", "problem_image_0", "reasoning_image_0")
THOUGHT_COLUMN = "resoning_thought_{}"  # sic: the released datasets spell it "resoning"
IMAGE_COLUMN = "reasoning_image_{}"
TEXT_ONLY_THOUGHT_COLUMN = "full_text_only_thought"
LAYOUT = (
    "<root>/<Task>/data/train-00000-of-0000N.parquet, each file with the columns "
    + ", ".join(REQUIRED_COLUMNS)
    + " and resoning_thought_0, resoning_thought_1 (sic), as in the ThinkMorph datasets on the hub"
)
# Row groups held decoded in memory; training reads rows in shuffled order, so a larger cache
# buys little and costs one row group of images per entry.
CACHED_ROW_GROUPS = 8
# Datasets whose answers are chart values, scored with ChartQA's relaxed accuracy (5 %).
RELAXED_DATASETS = frozenset({"Chart_Refocus"})
RELAXED_TOLERANCE = 0.05


class DataLayoutError(ValueError):
    """The data directory does not hold what the task needs; the message says what belongs there."""


@dataclass(frozen=True)
class ParquetSource:
    """One parquet file: its dataset, columns and row-group boundaries.

    ``group_starts`` holds the first row of every row group, then the file's row count.
    """

    dataset: str
    path: Path
    columns: frozenset[str]
    group_starts: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return self.group_starts[-1]

    def locate(self, row: int) -> tuple[int, int]:
        """(row group, offset inside it) of ``row``."""
        group = bisect.bisect_right(self.group_starts, row) - 1
        return group, row - self.group_starts[group]


@dataclass(frozen=True, order=True)
class RowRef:
    """A row of the data: ``source`` indexes ``ThinkMorphDataTask.sources``."""

    source: int
    row: int


# ---------------------------------------------------------------- images
def composite_rgb(image: Image.Image) -> Image.Image:
    """RGB ``image``; transparent pixels (RGBA, LA, or P with transparency) are laid on white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any, base: Path) -> Image.Image:
    """A PIL RGB image from a parquet image cell: a ``{bytes, path}`` struct or raw bytes.

    Without bytes, ``path`` is read (relative paths from ``base``). Raises ValueError when the
    cell is empty or cannot be decoded.
    """
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path:
            data = (base / path).read_bytes() if (base / path).is_file() else None
    else:
        data = value
    if not data:
        raise ValueError("empty image cell")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            return composite_rgb(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"undecodable image: {error}") from error


# ---------------------------------------------------------------- scoring
_MOVE_WORDS = {"u": "U", "up": "U", "d": "D", "down": "D", "l": "L", "left": "L", "r": "R", "right": "R"}
_LETTER = re.compile(r"^\(?([A-Z])\)?[.:]?$")
_PAREN_OPTION = re.compile(r"\(([A-Z])\)\s*(.*?)(?=\s*\([A-Z]\)|\n|$)")
_LINE_OPTION = re.compile(r"^\s*([A-Z])[.:)]\s+(.+?)\s*$", re.MULTILINE)
_QUOTES = "\"'`"


def _unwrap(text: str) -> str:
    """``text`` without an ``<answer>`` tag and ``\\boxed{}`` around the answer, stripped."""
    inner = answer_tag(text)
    inner = text if inner is None else inner
    return (boxed(inner) or inner).strip()


def question_options(question: str) -> dict[str, str]:
    """The options a question lists as ``(A) text`` or as lines ``A. text``, when they run A, B,
    ... without gaps (at least two); else an empty dict."""
    for pattern in (_PAREN_OPTION, _LINE_OPTION):
        options = {letter: text.strip() for letter, text in pattern.findall(question)}
        letters = sorted(options)
        if len(letters) >= 2 and letters == [chr(ord("A") + i) for i in range(len(letters))]:
            return options
    return {}


def moves(text: str) -> list[str] | None:
    """The move sequence ``text`` spells (U/D/L/R or up/down/left/right, separated by commas,
    spaces or arrows), or None if it holds anything else."""
    words = [word for word in re.split(r"[\s,;.\->→]+", text.lower()) if word]
    if not words or any(word not in _MOVE_WORDS for word in words):
        return None
    return [_MOVE_WORDS[word] for word in words]


def normalise(text: str) -> str:
    """Casefolded, whitespace collapsed, surrounding quotes and a trailing period removed."""
    text = " ".join(text.casefold().split()).strip(_QUOTES).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def score_answer(response: str, reference: str, question: str = "", relaxed: bool = False) -> Score:
    """Score ``response`` against ``reference`` (see :meth:`ThinkMorphDataTask.score`)."""
    gold = _unwrap(reference)
    tagged = answer_tag(response)
    prediction = _unwrap(tagged) if tagged is not None else boxed(response)

    letter = _LETTER.match(gold)
    if letter:
        gold_letter = letter.group(1)
        options = question_options(question)
        if gold_letter not in options:
            options = {chr(code): "" for code in range(ord("A"), max(ord(gold_letter), ord("D")) + 1)}
        chosen = (infer_option(prediction, options) if prediction else None) or extract_choice(response, options)
        return _verdict(chosen == gold_letter, chosen)

    if prediction is None:
        return _verdict(False, None)
    gold_moves = moves(gold)
    if gold_moves is not None:
        predicted_moves = moves(prediction)
        shown = ", ".join(predicted_moves) if predicted_moves is not None else normalise(prediction)
        return _verdict(predicted_moves == gold_moves, shown)
    tolerance = RELAXED_TOLERANCE if relaxed else 0.0
    predicted, target = normalise(prediction), normalise(gold)
    return _verdict(relaxed_correct(predicted, target, tolerance=tolerance), predicted)


def _verdict(correct: bool, extracted: str | None) -> Score:
    return Score(correct=correct, value=float(correct), extracted=extracted)


# ---------------------------------------------------------------- discovery
def _find_sources(root: Path, dataset: str, split_pattern: str) -> list[ParquetSource]:
    directory = root / dataset / "data"
    if not directory.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataLayoutError(
            f"dataset {dataset!r}: no directory {directory}; expected {LAYOUT}. Folders in {root}: {present or 'none'}"
        )
    paths = sorted(p for p in directory.glob("*.parquet") if split_pattern in p.name)
    if not paths:
        present = sorted(p.name for p in directory.iterdir())
        raise DataLayoutError(
            f"dataset {dataset!r}: no *.parquet file whose name contains {split_pattern!r} in {directory} "
            f"(it holds {present or 'nothing'}); expected {LAYOUT}"
        )
    sources = []
    for path in paths:
        metadata = pq.read_metadata(path)
        columns = frozenset(metadata.schema.to_arrow_schema().names)
        missing = [column for column in REQUIRED_COLUMNS if column not in columns]
        if missing:
            raise DataLayoutError(f"{path}: missing columns {missing} (it has {sorted(columns)}); expected {LAYOUT}")
        if THOUGHT_COLUMN.format(0) not in columns:
            raise DataLayoutError(
                f"{path}: no {THOUGHT_COLUMN.format(0)!r} column (spelled 'resoning', as in the released data), "
                f"so every row would be skipped for lacking a thought; it has {sorted(columns)}"
            )
        starts = [0]
        for group in range(metadata.num_row_groups):
            starts.append(starts[-1] + metadata.row_group(group).num_rows)
        sources.append(ParquetSource(dataset, path, columns, tuple(starts)))
    return sources


def _held_out_score(seed: int, dataset: str, pid: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, dataset, pid): rows below eval_fraction are held out."""
    digest = hashlib.blake2b(f"{seed}\0{dataset}\0{pid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


# ---------------------------------------------------------------- the task
class ThinkMorphDataTask(Task):
    """ThinkMorph's Visual_Search, Spatial_Navigation, Jigsaw_Assembly and Chart_Refocus rows.

    Construction reads parquet footers only (plus the ``pid`` column when ``eval_fraction`` > 0);
    rows are read on demand, one row group at a time, with a small cache.
    """

    def __init__(self, params: ThinkMorphDataParams):
        self.params = params
        root = Path(params.root).expanduser()
        if not root.is_dir():
            raise DataLayoutError(f"task root {str(root)!r} is not a directory; it must hold {LAYOUT}")
        self.sources: list[ParquetSource] = []
        rows: list[RowRef] = []
        caps = params.num_used or [None] * len(params.datasets)
        for dataset, cap in zip(params.datasets, caps, strict=True):
            taken = 0
            for source in _find_sources(root, dataset, params.split_pattern):
                room = source.num_rows if cap is None else min(source.num_rows, cap - taken)
                rows.extend(RowRef(len(self.sources), row) for row in range(room))
                self.sources.append(source)
                taken += room
        held_out = self._held_out(rows) if params.eval_fraction > 0 else {}
        self.train_rows: tuple[RowRef, ...] = tuple(ref for ref in rows if ref not in held_out)
        self.eval_rows: tuple[RowRef, ...] = tuple(sorted(held_out, key=held_out.__getitem__))
        self._usable: dict[tuple[int, int], list[bool]] = {}
        self._groups: OrderedDict[tuple[int, int], list[dict[str, Any]]] = OrderedDict()
        self._eval_refs: list[RowRef] | None = None
        self._eval: list[Problem] = []

    def _held_out(self, rows: Sequence[RowRef]) -> dict[RowRef, float]:
        """The held-out rows, each with its hash value (the evaluation order)."""
        pids: dict[int, list[Any]] = {}
        held = {}
        for ref in rows:
            source = self.sources[ref.source]
            if ref.source not in pids:
                pids[ref.source] = pq.read_table(source.path, columns=["pid"]).column("pid").to_pylist()
            value = _held_out_score(self.params.shuffle_seed, source.dataset, str(pids[ref.source][ref.row]))
            if value < self.params.eval_fraction:
                held[ref] = value
        return held

    # ------------------------------------------------------------ reading rows
    def _thought_columns(self, source: ParquetSource) -> list[str]:
        names = (THOUGHT_COLUMN.format(i) for i in range(self.params.max_reference_images))
        return [name for name in names if name in source.columns]

    def _row_group(self, source_index: int, group: int) -> list[dict[str, Any]]:
        """The rows of one row group as dicts (LRU-cached), with the columns a problem needs."""
        key = (source_index, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        source = self.sources[source_index]
        images = (IMAGE_COLUMN.format(i) for i in range(self.params.max_reference_images))
        wanted = [*REQUIRED_COLUMNS, "task", TEXT_ONLY_THOUGHT_COLUMN, *self._thought_columns(source), *images]
        columns = list(dict.fromkeys(name for name in wanted if name in source.columns))
        with pq.ParquetFile(source.path) as parquet:
            rows = parquet.read_row_group(group, columns=columns).to_pylist()
        self._groups[key] = rows
        if len(self._groups) > CACHED_ROW_GROUPS:
            self._groups.popitem(last=False)
        return rows

    def usable(self, ref: RowRef) -> bool:
        """Whether the row is kept: non-empty question and answer, and at least one thought text.

        Decided from the text columns alone (memoised per row group), so the training stream's
        positions never depend on decoding images.
        """
        source = self.sources[ref.source]
        group, offset = source.locate(ref.row)
        key = (ref.source, group)
        if key not in self._usable:
            columns = ["question", "answer", *self._thought_columns(source)]
            with pq.ParquetFile(source.path) as parquet:
                rows = parquet.read_row_group(group, columns=columns).to_pylist()
            self._usable[key] = [_keeps(row, columns[2:]) for row in rows]
        return self._usable[key][offset]

    def problem(self, ref: RowRef) -> Problem:
        """The problem of one row (usable or not). Raises ValueError if its problem image cannot
        be decoded; an undecodable visual thought becomes None."""
        source = self.sources[ref.source]
        group, offset = source.locate(ref.row)
        row = self._row_group(ref.source, group)[offset]
        base = source.path.parent
        try:
            image = decode_image(row["problem_image_0"], base)
        except (ValueError, OSError) as error:
            raise ValueError(f"{source.path} row {ref.row} (pid {row['pid']!r}): problem_image_0: {error}") from None
        references = []
        for i in range(self.params.max_reference_images):
            cell = row.get(IMAGE_COLUMN.format(i))
            try:
                references.append(decode_image(cell, base) if cell is not None else None)
            except (ValueError, OSError):
                references.append(None)
        metadata = {
            "dataset": source.dataset,
            "pid": str(row["pid"]),
            "thoughts": _thoughts(row, self._thought_columns(source)),
            "reference_images": sum(picture is not None for picture in references),
        }
        if row.get("task") is not None:
            metadata["task"] = row["task"]
        thought = row.get(TEXT_ONLY_THOUGHT_COLUMN)
        return Problem(
            id=f"{source.dataset}/{row['pid']}",
            image=image,
            question=row["question"],
            reference_answer=str(row["answer"]),
            visual_thought=references[0],
            metadata=metadata,
            reference_trace=text_only_trace(thought, str(row["answer"])) if _text(thought) else None,
        )

    # ------------------------------------------------------------ the Task role
    def epoch_order(self, seed: int, epoch: int) -> list[RowRef]:
        """The training rows of ``epoch``, usable or not: the enumeration order (datasets, files,
        rows) shuffled by ``random.Random(seed)`` in epoch 0 and ``random.Random(f"{seed}:{epoch}")``
        after."""
        order = list(self.train_rows)
        random.Random(seed if epoch == 0 else f"{seed}:{epoch}").shuffle(order)
        return order

    def train_problems(self, seed: int, start: int = 0) -> Iterator[Problem]:
        """The endless training stream for ``seed``, from position ``start``.

        The underlying order is :meth:`epoch_order` for epochs 0, 1, ...; the stream is that
        order with unusable rows left out, and position p is the p-th problem of the stream
        (so a run that consumed p problems resumes with ``start=p``). Whether a row is usable
        depends on its text alone, so reaching ``start`` reads text columns, never images, and
        whole epochs are skipped by counting usable rows.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if not self.train_rows:
            raise ConfigError(
                f"task.eval_fraction: {self.params.eval_fraction} holds out every row of {self.params.datasets}, "
                "leaving no training rows; lower it"
            )
        per_epoch = None
        if start > 0:
            per_epoch = sum(self.usable(ref) for ref in self.train_rows)
        first_epoch = 0
        position = 0
        if per_epoch:
            first_epoch = start // per_epoch
            position = first_epoch * per_epoch
        for epoch in count(first_epoch):
            yielded_before = position
            for ref in self.epoch_order(seed, epoch):
                if not self.usable(ref):
                    continue
                if position >= start:
                    yield self.problem(ref)
                position += 1
            if position == yielded_before:
                raise ValueError(
                    f"no usable training row in {self.params.datasets}: every row lacks a question, an answer "
                    "or a resoning_thought_i text"
                )

    def eval_problems(self, limit: int | None = None) -> Sequence[Problem]:
        """The usable held-out rows in a fixed order (ascending split hash, which mixes the
        datasets), at most ``eval_size`` and ``limit`` of them.

        Raises ConfigError when there are none: with ``eval_fraction = 0`` (the paper's setting)
        every row is a training row, and evaluation belongs to a benchmark task.
        """
        if not self.eval_rows:
            if self.params.eval_fraction == 0:
                raise ConfigError(
                    "task.eval_fraction: the ThinkMorph data task has no evaluation problems with eval_fraction = 0 "
                    "(every row trains, as in the paper); set it (e.g. 0.02) to hold rows out, or evaluate with a "
                    "benchmark task"
                )
            raise ConfigError(
                f"task.eval_fraction: no row of the {len(self.train_rows)} fell into the held-out fraction "
                f"{self.params.eval_fraction}; raise it"
            )
        if self._eval_refs is None:
            self._eval_refs = [ref for ref in self.eval_rows if self.usable(ref)][: self.params.eval_size]
        wanted = len(self._eval_refs) if limit is None else min(limit, len(self._eval_refs))
        while len(self._eval) < wanted:
            self._eval.append(self.problem(self._eval_refs[len(self._eval)]))
        return self._eval[:wanted]

    def score(self, problem: Problem, response: str) -> Score:
        r"""Correct when the response's answer matches the row's answer.

        The reference is unwrapped from ``<answer>``/``\boxed{}`` if it carries them. The
        prediction is the last ``<answer>...</answer>`` of the response (its ``\boxed{}``
        content if it has one), else the response's last ``\boxed{}``. Then, by the reference:

        * an option letter (``B``, ``(B)``, ``B.``): the options are parsed from the question
          (``(A) text`` or lines ``A. text``; else the letters A to max(D, reference)); the
          chosen letter is the core's option inference on the prediction (letter, then option
          text), falling back to :func:`~opsd_core.api.scoring.extract_choice` on the
          whole response (the harness's rule);
        * a move sequence (U/D/L/R or up/down/left/right, as Spatial_Navigation answers):
          the predicted moves must equal it exactly. The maze is not in the data, so another
          valid route counts wrong (VSP's simulator cannot be used here);
        * anything else: equal after normalising (case, whitespace, quotes, a final period);
          numbers compare as numbers (``1,000`` = ``1000``, ``%``), within ChartQA's relaxed 5 %
          for Chart_Refocus and exactly elsewhere.

        A response without an answer tag or ``\boxed{}`` is wrong unless the reference is a
        letter the whole response names. ``extracted`` is the letter, moves or normalised text.
        """
        if problem.reference_answer is None:
            raise ValueError(f"problem {problem.id!r} has no reference answer to score against")
        relaxed = problem.metadata.get("dataset") in RELAXED_DATASETS
        return score_answer(response, problem.reference_answer, problem.question, relaxed=relaxed)


def _text(value: Any) -> bool:
    """Whether a cell holds non-blank text."""
    return isinstance(value, str) and bool(value.strip())


def _thoughts(row: Mapping[str, Any], columns: Sequence[str]) -> list[str]:
    return [row[name] for name in columns if _text(row.get(name))]


def _keeps(row: Mapping[str, Any], thought_columns: Sequence[str]) -> bool:
    question, answer = row.get("question"), row.get("answer")
    return bool(str(question or "").strip() and str(answer or "").strip() and _thoughts(row, thought_columns))
