"""``opsd run --nproc-per-node 2`` of the debug flavour on CPU (gloo): the whole command, every
phase, with the sharded start-up (rank 0 builds, the start model waits in host memory while
the phase trains and comes back for the KL diagnostics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd_core.testing.runs import run_config_file
from opsd_thinkmorph.demo_data import write_demo_dataset

pytestmark = pytest.mark.multiprocess

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "thinkmorph-debug.toml"


def test_two_process_run_finishes_every_phase(tmp_path):
    data = write_demo_dataset(tmp_path / "data", rows_per_dataset=8, side=64)
    overrides = [
        f"task.root='{data}'", "schedule.total_steps=2", "run.threads=1", "sampling.visual_thoughts='auto'",
        "eval.limit=2", "diagnostics.kl_samples=2",
    ]  # fmt: skip
    run = run_config_file(EXAMPLE, tmp_path / "runs", overrides, arguments=["--nproc-per-node", "2"])
    assert run.missing_files() == []
    assert [line["step"] for line in run.step_metrics()] == [1, 2]
    assert [line["step"] for line in run.step_metrics("noise")] == [1, 2]
    results = run.results()
    assert {"start", "opsd", "noise"} <= set(results)
    assert results["opsd"]["kl_t0"] > 0 and results["noise"]["kl_t0"] > 0
