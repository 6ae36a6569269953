"""The run directory's own logger: ``metrics.jsonl`` lines and the media pages.

Owns: writing each logged step as one JSON line through :class:`~opsd_core.rundir.MetricsLog`
(the file the report, the throughput figure and resume read) and each media record as an HTML
page under ``media/``. Always on: the run directory is the record of a run.
Does not know: what the scalars mean; the evaluation results are ``results.json``'s (the
experiment writes them), so they are not repeated here, and neither is the config
(``config.toml``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opsd_core.interfaces.logger import Logger, MediaSample
from opsd_core.rundir import MetricsLog, RunDirectory, write_atomic


class JsonlLogger(Logger):
    """Metric lines in ``metrics.jsonl``, media pages in ``media/``."""

    def __init__(self, run_dir: Path, config: Any = None, metrics: MetricsLog | None = None):
        self.run_dir = RunDirectory(Path(run_dir))
        self.metrics = metrics or self.run_dir.metrics

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Nothing: the run directory holds the resolved config as ``config.toml``."""

    def log_scalars(self, phase: str, step: int, scalars: Mapping[str, float]) -> None:
        rounded = {key: round(float(value), 8) for key, value in scalars.items()}
        self.metrics.append({"phase": phase, "step": step} | rounded)

    def log_results(self, phase: str, step: int, results: Mapping[str, float]) -> None:
        """Nothing: ``results.json`` holds every phase's evaluation."""

    def log_media(self, phase: str, step: int, samples: Sequence[MediaSample], html: str) -> None:
        write_atomic(self.run_dir.media_path(phase, step), html)

    def close(self) -> None:
        """Nothing to release: every line is written and closed as it comes."""
