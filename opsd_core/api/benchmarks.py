"""The public building blocks of a benchmark plugin: evaluation-only tasks read from local files
and scored by the paper's harness rules.

Owns: the list of names a benchmark plugin's ``tasks.py`` may use, grouped below: the task base
class and its item, reading a Hugging Face parquet release (the release, its row, the fields a
converter returns, the cell readers), the harness's prompt and scoring rules with the verdict
they return, and the aggregations benchmarks report. They keep their meaning and signatures
within a minor version, like :mod:`opsd_core.api`.
Does not know: any particular benchmark. Importing it imports torch (through the evaluation
package), so import it from a plugin's ``tasks.py``, never from ``plugin.py`` or ``config.py``.
"""

from opsd_core.evaluation.benchmarks import (
    BenchmarkTask,
    category_accuracies,
    circular_groups,
    multiple_choice_prompt,
)
from opsd_core.evaluation.items import OPTION_LETTERS, BenchmarkDataError, BenchmarkFileMissing, BenchmarkItem
from opsd_core.evaluation.parquet import (
    ItemFields,
    ParquetRelease,
    Row,
    cell_answer_letter,
    cell_image,
    cell_integer,
    cell_options,
    cell_text,
)
from opsd_core.evaluation.rules import Verdict, chartqa, circular_copy, maze_rows, multiple_choice, vsp
from opsd_core.evaluation.scorers import CIRCULAR_OFFSET, mean_of_group_accuracies, pair_accuracy

__all__ = [
    # The task a benchmark is, and what it reads.
    "BenchmarkTask",
    "BenchmarkItem",
    "BenchmarkDataError",
    "BenchmarkFileMissing",
    "OPTION_LETTERS",
    # Parquet releases: where one lives and how its rows become items.
    "ParquetRelease",
    "Row",
    "ItemFields",
    "cell_image",
    "cell_integer",
    "cell_text",
    "cell_options",
    "cell_answer_letter",
    # The harness's prompt and scoring rules.
    "multiple_choice_prompt",
    "Verdict",
    "multiple_choice",
    "circular_copy",
    "vsp",
    "maze_rows",
    "chartqa",
    # Aggregations.
    "CIRCULAR_OFFSET",
    "circular_groups",
    "category_accuracies",
    "mean_of_group_accuracies",
    "pair_accuracy",
]
