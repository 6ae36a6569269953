"""The normalised benchmark item, and the error every unreadable benchmark input raises.

Owns: :class:`BenchmarkItem` (what both readers, TSV and parquet, produce), the option letters,
and :class:`BenchmarkDataError`, whose message is one line naming the file, the row and the
problem.
Does not know: file formats, scoring or models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opsd_core.errors import OpsdError

OPTION_LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class BenchmarkDataError(OpsdError, ValueError):
    """A benchmark file, column, row, image, index or predictions line cannot be read.

    The message names the file, the row (or line) and what is wrong with it.
    """


class BenchmarkFileMissing(BenchmarkDataError, FileNotFoundError):
    """A benchmark's files are not under the data root; the message says what belongs there."""


@dataclass(frozen=True)
class BenchmarkItem:
    """One question of a benchmark, normalised.

    Attributes:
        benchmark: the benchmark's name.
        index: the row's ``index`` column (unique within the benchmark's pooled files).
        source_file: the file it came from (a TSV, or a parquet shard relative to the data root).
        images: PIL images, in order.
        question: the question text as stored.
        options: option letter -> text, for multiple-choice rows (TSV numbers rendered as the
            harness's table reader renders them, see :func:`opsd_core.evaluation.rules.render_column`).
        answer: the gold answer (a letter, a number or a short string; ChartQA may list several).
        hint: the ``hint`` column, if any.
        category: the ``category`` column, if any.
        extra: other columns (``maze_map``, ``maze_size``, ``source``, ``split``, ``prompt``, ...).
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
