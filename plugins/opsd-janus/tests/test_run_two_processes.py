"""``opsd run --nproc-per-node 2`` of the debug flavour on CPU (gloo): the whole command, every
phase. Janus-Pro has no meta-device skeleton, so every rank builds the start model whole and
the trainer shards its copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd_core.testing.runs import run_config_file
from opsd_thinkmorph.demo_data import write_demo_dataset

pytestmark = pytest.mark.multiprocess

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "janus-pro-debug.toml"


def test_two_process_run_finishes_every_phase(tmp_path):
    data = write_demo_dataset(tmp_path / "data", rows_per_dataset=8, side=64)
    overrides = [
        f"task.root='{data}'", "schedule.total_steps=2", "schedule.warmup_steps=1", "run.threads=1",
        "experiment.noise_control=false",
    ]  # fmt: skip
    run = run_config_file(EXAMPLE, tmp_path / "runs", overrides, arguments=["--nproc-per-node", "2"])
    assert run.missing_files() == []
    assert [line["step"] for line in run.step_metrics()] == [1, 2]
    assert {"start", "opsd"} <= set(run.results())
    assert run.latest_checkpoint().name == "step-0000002"
