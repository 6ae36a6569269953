"""Hugging Face parquet releases of benchmarks, read into the items the TSV reader produces.

Owns: :class:`ParquetRelease` (a release's folder under a data root, its configs, its split,
its columns and the converter of one row), finding the shards
(``data/<split>-NNNNN-of-NNNNN.parquet``, or ``<split>*.parquet`` directly in the folder),
checking that a shard has the columns its release is read from, turning the converters' fields
into :class:`~opsd_core.evaluation.items.BenchmarkItem` (indices from an index column or the
row's position, option-rotated copies at index + k * 1e6), and the cell readers converters
share: images from ``{bytes, path}`` structs, integers, texts, options from list columns,
answers given as ``(A)``, a letter or the option's text. Every unreadable cell names the shard,
the row and the column.
Does not know: which benchmark has which release (a benchmark task declares its own), scoring,
prompts or models; VLMEvalKit TSVs (:mod:`opsd_core.evaluation.benchmarks`).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsd_core.evaluation.items import OPTION_LETTERS, BenchmarkDataError, BenchmarkFileMissing, BenchmarkItem
from opsd_core.evaluation.scorers import CIRCULAR_OFFSET


@dataclass(frozen=True)
class Row:
    """One parquet row and where it is, for error messages.

    Attributes:
        values: column -> value (structs as dicts, lists as lists).
        shard: the shard's path relative to the data root.
        number: the row's 0-based number within the shard.
        config: the release config the shard belongs to ("" for single-config releases).
    """

    values: Mapping[str, Any]
    shard: str
    number: int
    config: str = ""

    def where(self, column: str) -> str:
        return f"{self.shard}, row {self.number}, column {column!r}"


@dataclass(frozen=True)
class ItemFields:
    """What a converter makes of one row; ``copy`` > 0 marks a rotated copy (index + copy * 1e6)."""

    images: tuple[Any, ...]
    question: str
    options: Mapping[str, str]
    answer: Any
    category: str | None = None
    extra: Mapping[str, Any] | None = None
    part: str | None = None
    copy: int = 0


@dataclass(frozen=True)
class ParquetRelease:
    """A benchmark's Hugging Face parquet release.

    Attributes:
        directory: its folder under the data root (the hub repository's name).
        split: the split read (shards whose file name starts with it); None for a release with
            one split, whose every shard is read.
        columns: columns every shard must have.
        convert: one row -> the items it gives (SAT gives one per option rotation).
        part: the VLMEvalKit file stem the items count under (None: the converter sets it).
        configs: config subfolders read, in this order (multi-config releases); all required.
        index_column: an integer column used as the item index; else the row's 0-based position
            over all shards in order.
    """

    directory: str
    split: str | None
    columns: tuple[str, ...]
    convert: Callable[[Row], list[ItemFields]]
    part: str | None = None
    configs: tuple[str, ...] = ()
    index_column: str | None = None

    def folders(self, root: Path) -> list[tuple[str, Path]]:
        base = Path(root) / self.directory
        return [(config, base / config) for config in self.configs] if self.configs else [("", base)]

    def location(self) -> str:
        shard = f"{self.split}-*.parquet" if self.split else "*.parquet"
        if self.configs:
            shown = self.configs[0] if len(self.configs) == 1 else "<subtask>"
            return f"{self.directory}/{shown}/{shard}"
        return f"{self.directory}/data/{shard}"

    def present(self, root: Path) -> bool:
        """True when the release's folder is there (its content is checked when read)."""
        return (Path(root) / self.directory).is_dir()

    def read(self, root: Path, benchmark: str) -> list[BenchmarkItem]:
        """Every item of the release under ``root``, shards in name order, configs in :attr:`configs` order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        root = Path(root)
        missing = [config for config, folder in self.folders(root) if not shards(folder, self.split)]
        if missing:
            listed = ", ".join(missing) if self.configs else str(root / self.directory)
            raise BenchmarkFileMissing(
                f"benchmark {benchmark!r}: no {self.split or 'parquet'!r} shards for {listed} "
                f"(expected {root / self.location()}, or the shards directly in the folder)"
            )
        items: list[BenchmarkItem] = []
        position = 0
        for config, folder in self.folders(root):
            for path in shards(folder, self.split):
                relative = path.relative_to(root).as_posix()
                try:
                    table = pq.read_table(path)
                except (OSError, pa.ArrowException) as error:
                    raise BenchmarkDataError(f"{path}: not a readable parquet file ({error})") from None
                absent = [column for column in self.columns if column not in table.column_names]
                if absent:
                    raise BenchmarkDataError(
                        f"{path}: column {absent[0]!r} is missing; the {benchmark} release is read from the "
                        f"columns {', '.join(self.columns)} (the shard has {', '.join(table.column_names)})"
                    )
                for number, values in enumerate(table.to_pylist()):
                    row = Row(values, relative, number, config)
                    base = position if self.index_column is None else cell_integer(row, self.index_column)
                    for fields in self.convert(row):
                        items.append(
                            BenchmarkItem(
                                benchmark=benchmark,
                                index=base + fields.copy * CIRCULAR_OFFSET,
                                source_file=relative,
                                images=fields.images,
                                question=fields.question,
                                options=fields.options,
                                answer=fields.answer,
                                category=fields.category,
                                extra=dict(fields.extra or {}),
                                part=fields.part or self.part,
                            )
                        )
                    position += 1
        return items


def shards(folder: Path, split: str | None) -> list[Path]:
    """The ``split`` shards (all, for None) of a release folder: under ``data/`` when it exists, else in the folder."""
    place = folder / "data" if (folder / "data").is_dir() else folder
    return sorted(path for path in place.glob("*.parquet") if split is None or path.name.startswith(split))


# ---------------------------------------------------------------------------------------------- cells
def cell_image(row: Row, column: str, value: Any = None) -> Any:
    """A PIL RGB image from a ``{bytes, path}`` struct (the ``datasets`` Image feature) or raw bytes."""
    from PIL import Image, UnidentifiedImageError

    value = row.values.get(column) if value is None else value
    data = value.get("bytes") if isinstance(value, Mapping) else value
    if not isinstance(data, (bytes, bytearray)):
        raise BenchmarkDataError(
            f"{row.where(column)}: expected an image as {{bytes, path}} with the bytes stored, got {type(data).__name__}"
        )
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise BenchmarkDataError(f"{row.where(column)}: the bytes are not a readable image ({error})") from None


def cell_integer(row: Row, column: str) -> int:
    """The integer in ``column`` of ``row``."""
    value = row.values.get(column)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BenchmarkDataError(f"{row.where(column)}: expected an integer index, got {value!r}") from None


def cell_text(row: Row, column: str) -> str:
    """The text in ``column`` of ``row`` (an empty value is an error)."""
    value = row.values.get(column)
    if value is None:
        raise BenchmarkDataError(f"{row.where(column)}: the value is empty")
    return str(value)


def cell_options(row: Row, column: str) -> dict[str, str]:
    """Option letter -> text of a list column (``["red", "blue"]`` -> ``{"A": "red", "B": "blue"}``)."""
    choices = row.values.get(column)
    if not isinstance(choices, Sequence) or isinstance(choices, str) or not choices:
        raise BenchmarkDataError(f"{row.where(column)}: expected a non-empty list of option texts, got {choices!r}")
    return {letter: str(text).strip() for letter, text in zip(OPTION_LETTERS, choices)}


def cell_answer_letter(row: Row, column: str, options: Mapping[str, str]) -> str:
    """The option letter of an answer stored as ``(A)``, ``A``, ``(a)`` or the option's text."""
    raw = cell_text(row, column).strip()
    letter = raw.strip("()").strip().upper()
    if letter in options:
        return letter
    by_text = [key for key, text in options.items() if text.lower() == raw.lower()]
    if len(by_text) == 1:
        return by_text[0]
    raise BenchmarkDataError(f"{row.where(column)}: answer {raw!r} is neither an option letter nor one option's text")
