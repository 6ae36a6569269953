"""Weights & Biases: one W&B run per opsd run, offline unless the environment says otherwise.

Owns: starting the W&B run in the run directory's ``trackers/wandb/`` with the resolved config,
scalars as ``<phase>/<name>`` against ``<phase>/step`` (each phase counts its own steps),
evaluation results as ``<phase>/eval/<name>``, media as an HTML panel, a table and the visual
thoughts as images, and finishing the run.
Does not know: accounts or networks: ``WANDB_MODE`` defaults to ``offline`` here (a run writes
files and never connects), and ``wandb sync`` uploads them later; set ``WANDB_MODE=online``
to stream. Needs the ``wandb`` package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from opsd_core.images import to_pil
from opsd_core.interfaces.logger import Logger, MediaSample
from opsd_core.rundir import RunDirectory

PROJECT = "opsd"


class WandbLogger(Logger):
    """A W&B run named after ``run.name`` in project ``opsd`` (``WANDB_PROJECT`` overrides it)."""

    packages = ("wandb",)

    def __init__(self, run_dir: Path, config: Any = None):
        import wandb

        self.wandb = wandb
        directory = RunDirectory(Path(run_dir)).tracker_dir("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT),
            name=Path(run_dir).name,
            dir=str(directory),
            mode=os.environ.get("WANDB_MODE", "offline"),
            settings=wandb.Settings(silent=True, console="off"),
        )
        self._phases: set[str] = set()

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def _phase_axis(self, phase: str) -> None:
        if phase not in self._phases:
            self.run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
            self._phases.add(phase)

    def log_scalars(self, phase: str, step: int, scalars: Mapping[str, float]) -> None:
        self._phase_axis(phase)
        self.run.log({f"{phase}/step": step} | {f"{phase}/{name}": float(value) for name, value in scalars.items()})

    def log_results(self, phase: str, step: int, results: Mapping[str, float]) -> None:
        self.log_scalars(phase, step, {f"eval/{name}": value for name, value in results.items()})

    def log_media(self, phase: str, step: int, samples: Sequence[MediaSample], html: str) -> None:
        self._phase_axis(phase)
        table = self.wandb.Table(columns=["problem", "correct", "mean_kl", "completion"])
        record: dict[str, Any] = {f"{phase}/step": step, f"{phase}/media/kl_tokens": self.wandb.Html(html)}
        for sample in samples:
            table.add_data(sample.problem_id, sample.correct, sample.mean_kl, sample.completion)
            if sample.visual_thought is not None:
                image = self.wandb.Image(to_pil(sample.visual_thought))
                record[f"{phase}/media/visual_thought/{sample.problem_id}"] = image
        record[f"{phase}/media/completions"] = table
        self.run.log(record)

    def close(self) -> None:
        self.run.finish()
        # finish() can return before W&B's service process has written the last records of an
        # offline run; shutting the service down waits for them (the next run starts it again).
        self.wandb.teardown()
