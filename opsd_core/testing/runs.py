"""Running ``opsd run`` on a config inside a test, and reading what the run wrote.

Owns: invoking the CLI in-process (``--no-progress``, ``--set`` overrides, the run directory
under a given root), failing with the CLI's output when the run fails, and reading a run
directory: its metric lines by phase, ``results.json``, the files every run writes, and its
checkpoints.
Does not know: any backend or task; the data a config needs is the caller's to write and pass
as overrides.

Use from a plugin's tests::

    @pytest.fixture(scope="module")
    def finished_run(tmp_path_factory):
        root = tmp_path_factory.mktemp("mine")
        return run_config_file(EXAMPLES / "mine-debug.toml", root, [f"task.root='{data}'"])

    def test_three_steps(finished_run):
        assert [line["step"] for line in finished_run.step_metrics()] == [1, 2, 3]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsd_core.rundir import CONFIG, METRICS, REPORT, RESULTS, RunDirectory

RUN_FILES = (CONFIG, METRICS, RESULTS, REPORT)
"""What every finished run directory holds."""


@dataclass(frozen=True)
class FinishedRun:
    """A run directory written by ``opsd run``, and what the command printed.

    Attributes:
        directory: ``run.output_dir / run.name``.
        output: the CLI's standard output and error.
    """

    directory: Path
    output: str

    def metrics(self, phase: str | None = None) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl`` (only ``phase``'s when given), in order."""
        return RunDirectory(self.directory).metrics.read(phase)

    def step_metrics(self, phase: str = "opsd") -> list[dict[str, Any]]:
        """The training-step lines of ``phase`` (those with a loss), in order."""
        return [line for line in self.metrics(phase) if "loss" in line]

    def results(self) -> dict[str, Any]:
        """``results.json``: one entry per finished phase (start, opsd, noise, ...)."""
        return RunDirectory(self.directory).read_results()

    def missing_files(self) -> list[str]:
        """The files of :data:`RUN_FILES` the run directory lacks."""
        return [name for name in RUN_FILES if not (self.directory / name).is_file()]

    def checkpoints(self, phase: str = "opsd") -> list[Path]:
        """The ``step-NNNNNNN`` checkpoint directories of ``phase``, oldest first."""
        return sorted((self.directory / phase / "checkpoints").glob("step-*"))

    def latest_checkpoint(self, phase: str = "opsd") -> Path:
        """The newest checkpoint of ``phase``; fails the test when there is none."""
        found = self.checkpoints(phase)
        assert found, f"no checkpoint written under {self.directory / phase / 'checkpoints'}"
        return found[-1]

    def checkpoint_model(self, backend: Any, phase: str = "opsd", name: str = "student") -> Any:
        """``backend``'s model with the ``name`` (student or teacher) weights of ``phase``'s newest
        checkpoint, as ``opsd eval --checkpoint`` loads them (over the start weights when the
        checkpoint keeps only trainable tensors)."""
        from opsd_core.trainer.checkpoint import load_model

        model = backend.build_model()
        load_model(backend, model, self.latest_checkpoint(phase), name)
        return model


def run_config_file(config: str | Path, root: Path, overrides: Sequence[str] = (), arguments: Sequence[str] = ()) -> FinishedRun:
    """Run ``opsd run CONFIG --no-progress`` in this process with the run's output under ``root``.

    Args:
        config: the run config (TOML) to run.
        root: parent of the run directory (``run.output_dir`` is set to it).
        overrides: ``--set`` assignments (``section.field=value``, values in TOML syntax).
        arguments: further arguments of ``opsd run``.

    Returns:
        The finished run; the test fails with the CLI's output when the command fails.
    """
    from click.testing import CliRunner

    from opsd_core.cli import cli
    from opsd_core.config import load_config

    overrides = [f"run.output_dir={json.dumps(str(root))}", *overrides]
    name = load_config(Path(config), overrides).run.name
    command = ["run", str(config), "--no-progress", *[part for item in overrides for part in ("--set", item)], *arguments]
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 0, f"opsd {' '.join(command)} failed:\n{result.output}"
    return FinishedRun(Path(root) / name, result.output)
