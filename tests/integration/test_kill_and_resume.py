"""Fault injection: `opsd run` killed (SIGKILL) at seeded random moments and resumed until it
finishes gives the same results and the same metric lines, each step once, as a run never
interrupted; a disk that fills up during a checkpoint ends the run with one line and keeps the
last good checkpoint."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_core.rundir import MetricsLog

QUICKSTART = str(Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml")
SHORT = [
    "schedule.total_steps=6",
    "schedule.warmup_steps=1",
    "train.samples_per_step=4",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "eval.limit=16",
    "diagnostics.kl_samples=8",
    "run.threads=1",
]


def _opsd(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "opsd_core", *arguments]


def _run_arguments(output: Path) -> list[str]:
    sets = [part for override in [f"run.output_dir='{output}'", *SHORT] for part in ("--set", override)]
    return ["run", QUICKSTART, "--no-progress", *sets]


def _is_timing(key: str) -> bool:
    return key.endswith("_s") or "seconds" in key or "per_s" in key or key == "peak_memory_gb"


def _comparable(directory: Path):
    """Results without wall times, and metric lines without timings."""
    results = json.loads((directory / "results.json").read_text())

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not _is_timing(k)}
        return value

    metrics = [{k: v for k, v in r.items() if not _is_timing(k)} for r in MetricsLog(directory / "metrics.jsonl").read()]
    return strip(results), metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output = tmp_path_factory.mktemp("straight")
    started = time.perf_counter()
    subprocess.run(_opsd(*_run_arguments(output)), check=True, capture_output=True, text=True)
    return output / "quickstart", time.perf_counter() - started


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_at_random_moments_and_resumed_equals_the_uninterrupted_run(uninterrupted, tmp_path, seed):
    straight, seconds = uninterrupted
    directory = tmp_path / "quickstart"
    rng = random.Random(seed)
    kills = 0
    while kills < 2:
        arguments = ["run", "--resume", str(directory), "--no-progress"] if (directory / "config.toml").is_file() else _run_arguments(tmp_path)
        process = subprocess.Popen(_opsd(*arguments), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.6) * seconds)
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    arguments = ["run", "--resume", str(directory), "--no-progress"] if (directory / "config.toml").is_file() else _run_arguments(tmp_path)
    finished = subprocess.run(_opsd(*arguments), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    results, metrics = _comparable(directory)
    expected_results, expected_metrics = _comparable(straight)
    assert results == expected_results
    steps = [(r["phase"], r["step"]) for r in metrics]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    assert metrics == expected_metrics
    assert not list(directory.glob("*/checkpoints/.tmp-*"))


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    from opsd_core.trainer import checkpoint

    real_save, saves = checkpoint.torch.save, []

    def filling_disk(state, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", filling_disk)
    overrides = ["schedule.total_steps=4", "schedule.warmup_steps=1", "train.samples_per_step=4",
                 "train.checkpoint_every=2", "eval.limit=8", "diagnostics.kl_samples=4"]  # fmt: skip
    sets = [part for override in [f"run.output_dir='{tmp_path}'", *overrides] for part in ("--set", override)]
    result = CliRunner().invoke(cli, ["run", QUICKSTART, "--no-progress", *sets])
    assert result.exit_code == 1
    assert "No space left on device" in result.output and "Traceback" not in result.output
    checkpoints = tmp_path / "quickstart" / "opsd" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002"]
    checkpoint.verify_checkpoint(checkpoints / "step-0000002")
