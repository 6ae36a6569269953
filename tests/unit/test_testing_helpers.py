"""The plugin-author helpers opsd_core.testing.runs (reading a run directory, running the CLI)
and opsd_core.testing.fsdp (the seeded task, comparing two runs' metrics and weights), on
run directories written here."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from opsd_core.testing import fsdp
from opsd_core.testing.runs import RUN_FILES, FinishedRun, run_config_file


def write_run(directory: Path, losses=(0.5, 0.4, 0.3), weight: float = 1.0, steps: int = 3, whole_run: bool = False) -> Path:
    """A trainer's directory (metric lines, the last step's weights under checkpoints/), or with
    ``whole_run`` an ``opsd run`` directory (a start line too, checkpoints under opsd/)."""
    directory.mkdir(parents=True)
    lines = [{"phase": "start", "kl": 0.2}] if whole_run else []
    lines += [{"phase": "opsd", "step": s + 1, "loss": loss, "grad_norm": 1.0, "step_s": 9.0 * s} for s, loss in enumerate(losses)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for name in ("student", "teacher"):
        target = directory / ("opsd" if whole_run else "") / "checkpoints" / f"step-{steps:07d}" / name
        target.mkdir(parents=True)
        save_file({"w": torch.full((2,), weight)}, str(target / "model.safetensors"))
    return directory


def test_a_finished_run_reads_its_metrics_results_and_checkpoints(tmp_path):
    run = FinishedRun(write_run(tmp_path / "run", whole_run=True), "")
    assert [line["step"] for line in run.step_metrics("opsd")] == [1, 2, 3]
    assert run.metrics("start") == [{"phase": "start", "kl": 0.2}]
    assert run.step_metrics("noise") == []
    assert run.latest_checkpoint().name == "step-0000003"
    assert set(run.missing_files()) == set(RUN_FILES) - {"metrics.jsonl"}
    (run.directory / "results.json").write_text('{"start": {}, "opsd": {}}')
    assert set(run.results()) == {"start", "opsd"}
    with pytest.raises(AssertionError, match="no checkpoint"):
        run.latest_checkpoint("noise")


def test_a_failing_cli_run_fails_the_test_with_its_output(tmp_path):
    config = tmp_path / "quick.toml"
    config.write_text('[run]\nname = "quick"\n')
    with pytest.raises(AssertionError, match=r"(?s)opsd run .*quick.toml.* failed:.*--no-such-option"):
        run_config_file(config, tmp_path, arguments=["--no-such-option"])


def test_the_seeded_task_is_endless_reproducible_and_resumable():
    task = fsdp.SeededProblems()
    first = list(itertools.islice(task.train_problems(seed=3), 5))
    again = list(itertools.islice(task.train_problems(seed=3, start=2), 3))
    assert [p.id for p in first] == [f"p{i}" for i in range(5)]
    for a, b in zip(first[2:], again):
        assert a.id == b.id and torch.equal(a.image, b.image) and torch.equal(a.visual_thought, b.visual_thought)
    assert [tuple(p.image.shape) for p in first[:3]] == [(3, 28, 42), (3, 42, 42), (3, 56, 42)]
    other = next(task.train_problems(seed=4))
    assert not torch.equal(other.image, first[0].image)


def test_the_comparison_config_has_the_harness_settings():
    config = fsdp.comparison_config(activation_checkpointing=True)
    assert config.schedule.total_steps == fsdp.STEPS and config.optim.eps == fsdp.ADAM_EPS
    assert config.train.activation_checkpointing and config.train.samples_per_step == 2
    assert config.train.checkpoint_every == 2 and config.train.keep_checkpoints >= 2


def test_runs_compare_within_tolerance_and_bit_for_bit(tmp_path):
    base = write_run(tmp_path / "base")
    close = write_run(tmp_path / "close", losses=(0.5, 0.4, 0.3 * (1 + 1e-6)), weight=1.0 + 1e-7)
    far = write_run(tmp_path / "far", losses=(0.5, 0.44, 0.3))
    moved = write_run(tmp_path / "moved", weight=1.001)
    fsdp.assert_same_run(base, close)
    with pytest.raises(AssertionError, match="step 2"):
        fsdp.assert_same_run(base, far)
    with pytest.raises(AssertionError, match="student w"):
        fsdp.assert_same_run(base, moved)
    fsdp.assert_identical_runs(base, write_run(tmp_path / "same"))
    with pytest.raises(AssertionError):
        fsdp.assert_identical_runs(base, close)


def test_a_run_missing_a_step_is_refused(tmp_path):
    short = write_run(tmp_path / "short", losses=(0.5, 0.4))
    with pytest.raises(AssertionError):
        fsdp.step_metrics(short)
