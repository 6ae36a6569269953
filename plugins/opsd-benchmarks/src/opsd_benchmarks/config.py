"""Params of the benchmark tasks.

Owns: the one setting a benchmark task reads when a run's ``[task]`` names it: where its files
are. ``opsd eval --benchmarks`` and ``[eval] benchmarks`` pass their own data root instead.
Does not know: torch or the benchmarks' files; importing this module stays light.
"""

from __future__ import annotations

from pydantic import Field

from opsd_core.api import PluginParams


class BenchmarkParams(PluginParams):
    """A benchmark read from local files (its VLMEvalKit TSVs, else its Hugging Face parquet release)."""

    data_root: str | None = Field(
        None,
        description="Directory holding the benchmark's VLMEvalKit TSV files or its parquet release folder "
        "(needed when [task] names a benchmark for `opsd eval` of the student, teacher and noise contexts).",
        min_length=1,
    )
