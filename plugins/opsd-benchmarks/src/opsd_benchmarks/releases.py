"""The Hugging Face parquet releases of six of the benchmarks, and how their rows become items.

Owns: each release's folder under a data root, its configs (BLINK's subtasks), its split and its
columns, and the converter of one row: images from ``{bytes, path}`` structs, options from list
columns, an ``(a) … (b) …`` string (MMVP) or ``(A) …`` lines after the question (V*), answers
given as ``(A)``, a letter, an option index or the option's text, and SAT's option-rotated
copies (the release is not circular; the paper's harness scores the circular copies).
Does not know: scoring or prompts (:mod:`opsd_benchmarks.tasks`); how shards are found and
read (the core's parquet reader). VSP, VisPuzzle and the ChartQA bar subsets have no release.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from opsd_core.api.benchmarks import (
    OPTION_LETTERS,
    BenchmarkDataError,
    ItemFields,
    ParquetRelease,
    Row,
    cell_answer_letter,
    cell_image,
    cell_integer,
    cell_options,
    cell_text,
)

BLINK_SUBTASKS = (
    "Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test", "Jigsaw",
    "Multi-view_Reasoning", "Object_Localization", "Relative_Depth", "Relative_Reflectance",
    "Semantic_Correspondence", "Spatial_Relation", "Visual_Correspondence", "Visual_Similarity",
)
_LETTER_MARK = re.compile(r"\(([A-Za-z])\)\s*")
_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s*(.*)$")


def _blink(row: Row) -> list[ItemFields]:
    images = tuple(cell_image(row, f"image_{k}") for k in range(1, 5) if row.values.get(f"image_{k}") is not None)
    options = cell_options(row, "choices")
    category = row.values.get("sub_task") or row.config or None
    return [ItemFields(images, cell_text(row, "question"), options, cell_answer_letter(row, "answer", options), category)]


def _cv_bench(row: Row) -> list[ItemFields]:
    options = cell_options(row, "choices")
    kind = cell_text(row, "type").strip().upper()
    if kind not in ("2D", "3D"):
        raise BenchmarkDataError(f"{row.where('type')}: expected 2D or 3D, got {kind!r}")
    return [
        ItemFields(
            (cell_image(row, "image"),), cell_text(row, "question"), options, cell_answer_letter(row, "answer", options),
            category=row.values.get("task") or None, extra={"source": cell_text(row, "source")}, part=f"CV-Bench-{kind}",
        )
    ]


def _mmvp(row: Row) -> list[ItemFields]:
    pieces = _LETTER_MARK.split(cell_text(row, "Options"))  # ['', 'a', 'text ', 'b', 'text']
    options = {letter.upper(): text.strip() for letter, text in zip(pieces[1::2], pieces[2::2])}
    if len(options) < 2 or pieces[0].strip():
        raise BenchmarkDataError(f"{row.where('Options')}: expected options written '(a) … (b) …'")
    answer = cell_answer_letter(row, "Correct Answer", options)
    return [ItemFields((cell_image(row, "image"),), cell_text(row, "Question"), options, answer)]


def _sat(row: Row) -> list[ItemFields]:
    cells = row.values.get("image_bytes")
    if not isinstance(cells, Sequence) or isinstance(cells, (str, bytes)) or not cells:
        raise BenchmarkDataError(f"{row.where('image_bytes')}: expected a non-empty list of images")
    images = tuple(cell_image(row, "image_bytes", cell) for cell in cells)
    texts = list(cell_options(row, "answers").values())
    correct = cell_integer(row, "correct_answer_idx")
    if not 0 <= correct < len(texts):
        raise BenchmarkDataError(f"{row.where('correct_answer_idx')}: {correct} is not an index into the {len(texts)} answers")
    question, count = cell_text(row, "question"), len(texts)
    copies = []
    for shift in range(count):
        rotated = {OPTION_LETTERS[j]: texts[(j + shift) % count] for j in range(count)}
        copies.append(ItemFields(images, question, rotated, OPTION_LETTERS[(correct - shift) % count], copy=shift))
    return copies


def _vstar(row: Row) -> list[ItemFields]:
    lines = cell_text(row, "text").splitlines()
    marked = [(i, _OPTION_LINE.match(line.strip())) for i, line in enumerate(lines)]
    options = {match.group(1): match.group(2).strip() for _, match in marked if match}
    first = next((i for i, match in marked if match), None)
    if first is None or len(options) < 2:
        raise BenchmarkDataError(f"{row.where('text')}: expected the question followed by '(A) …' option lines")
    question = "\n".join(lines[:first]).strip()
    answer = cell_answer_letter(row, "label", options)
    return [ItemFields((cell_image(row, "image"),), question, options, answer, category=row.values.get("category") or None)]


_BLINK_COLUMNS = ("question", "choices", "answer", "image_1")
RELEASES: dict[str, ParquetRelease] = {
    "blink": ParquetRelease("BLINK", "val", _BLINK_COLUMNS, _blink, part="BLINK", configs=BLINK_SUBTASKS),
    "blink-jigsaw": ParquetRelease("BLINK", "val", _BLINK_COLUMNS, _blink, part="BLINK_Jigsaw", configs=("Jigsaw",)),
    "cv-bench": ParquetRelease("CV-Bench", "test", ("question", "choices", "answer", "image", "source", "type"), _cv_bench),
    "mmvp": ParquetRelease(
        "MMVP", None, ("Index", "Question", "Options", "Correct Answer", "image"), _mmvp, part="MMVP", index_column="Index"
    ),
    "sat": ParquetRelease("SAT", "test", ("image_bytes", "question", "answers", "correct_answer_idx"), _sat, part="SAT_circular"),
    "vstar": ParquetRelease("vstar-bench", None, ("image", "text", "label"), _vstar, part="VStarBench"),
}

