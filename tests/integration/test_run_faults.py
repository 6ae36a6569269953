"""Faults the machine causes while `opsd run` works: a read-only output directory and CUDA
running out of memory end in one line, leave nothing half-written and keep the last good
checkpoint; a resume that was allowed to change the learning rate trains with it."""

from __future__ import annotations

import errno
import json
import pathlib
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_core.rundir import MetricsLog
from opsd_core.trainer.trainer import Trainer

QUICKSTART = str(Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml")


def _short(output: Path) -> list[str]:
    settings = [
        f"run.output_dir='{output}'", "schedule.total_steps=4", "schedule.warmup_steps=1", "train.samples_per_step=2",
        "train.checkpoint_every=2", "eval.limit=4", "diagnostics.kl_samples=2", "experiment.noise_control=false",
        "logging.media_problems=0",
    ]  # fmt: skip
    return ["run", QUICKSTART, "--no-progress", *[part for setting in settings for part in ("--set", setting)]]


def _error_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def _refuse_writes_under(monkeypatch, folder: Path, method: str) -> None:
    """``pathlib.Path.<method>`` raises EACCES for paths under ``folder`` (writes only, for open),
    as a directory the user may read but not write does."""
    original = getattr(pathlib.Path, method)

    def refusing(self, *args, **kwargs):
        mode = args[0] if args else kwargs.get("mode", "r")
        writes = method == "mkdir" or (isinstance(mode, str) and any(flag in mode for flag in "wax+"))
        if writes and Path(self).is_relative_to(folder):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, method, refusing)


@pytest.mark.parametrize("method", ["mkdir", "open"])
def test_a_read_only_output_directory_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, method):
    output = tmp_path / "runs"
    output.mkdir()
    _refuse_writes_under(monkeypatch, output, method)
    result = CliRunner().invoke(cli, _short(output))
    assert result.exit_code == 1
    line = _error_line(result.output)
    assert "Permission denied" in line and str(output / "quickstart") in line, line
    assert list(output.iterdir()) == []


def test_cuda_out_of_memory_names_phase_step_and_plan_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    original = Trainer.train_step

    def train_step(self):
        if self.step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    result = CliRunner().invoke(cli, _short(tmp_path))
    assert result.exit_code == 1
    line = _error_line(result.output)
    assert "CUDA ran out of memory in phase 'opsd' after 2 of 4 optimizer steps" in line, line
    assert re.search(r"the memory planner estimates \d+\.\d GiB per GPU", line), line
    assert "train.activation_checkpointing = true" in line, line  # a switch the plan would try
    log = Path(re.search(r"full traceback in (\S+\.log)", line).group(1))
    assert "OutOfMemoryError" in log.read_text()
    log.unlink()
    checkpoints = tmp_path / "quickstart" / "opsd" / "checkpoints"
    assert [path.name for path in checkpoints.iterdir()] == ["step-0000002"]
    assert (checkpoints / "step-0000002" / "manifest.json").is_file()


def test_a_runtime_error_saying_cuda_out_of_memory_counts_as_one(tmp_path, monkeypatch):
    from opsd_core.experiment import Experiment

    def diagnose_start(self):
        raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB (GPU 0; 79.1 GiB total capacity)")

    monkeypatch.setattr(Experiment, "diagnose_start", diagnose_start)
    result = CliRunner().invoke(cli, _short(tmp_path))
    assert result.exit_code == 1
    line = _error_line(result.output)
    assert "CUDA ran out of memory in start-up" in line or "CUDA ran out of memory in the start" in line, line
    Path(re.search(r"full traceback in (\S+\.log)", line).group(1)).unlink()


def test_an_allowed_lr_change_on_resume_takes_effect(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, _short(tmp_path) + ["--set", "train.keep_checkpoints=2", "--set", "train.log_every=1"]).exit_code == 0
    directory = tmp_path / "quickstart"
    shutil.rmtree(directory / "opsd" / "checkpoints" / "step-0000004")  # as a kill after step 2's save leaves it
    results = json.loads((directory / "results.json").read_text())
    (directory / "results.json").write_text(json.dumps({"start": results["start"]}))
    resumed = runner.invoke(cli, ["run", "--resume", str(directory), "--no-progress", "--set", "optim.lr=1e-3", "--allow-changes"])
    assert resumed.exit_code == 0, resumed.output
    rates = {r["step"]: r["lr"] for r in MetricsLog(directory / "metrics.jsonl").read("opsd") if "lr" in r}
    assert rates[2] == pytest.approx(4.5e-4) and rates[3] == pytest.approx(1e-3 * 0.75)  # cosine at 1 of 3 steps
