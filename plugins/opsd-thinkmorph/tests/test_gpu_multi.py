"""``opsd run --nproc-per-node 2`` on two CUDA GPUs (``pytest -m gpu`` on a machine with two).

The debug flavour through the real command: NCCL, FSDP2 with bf16 mixed precision and fp32
master weights, activation checkpointing, the sharded start-up. A run of 3 steps checkpoints
every step; a copy of it with its step-3 checkpoint and results removed is resumed with
``opsd run --resume`` and must end with the same step-3 metrics and (sharded) weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsd_core.testing.fsdp import final_weights
from opsd_thinkmorph.demo_data import write_demo_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

CONFIG = Path(__file__).resolve().parents[3] / "examples" / "thinkmorph-debug.toml"


def opsd(*arguments: str) -> None:
    command = [sys.executable, "-c", "from opsd_core.testing.cli import main; main()", *arguments, "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "4"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]


def step_metrics(run: Path, step: int) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (line,) = [line for line in lines if line.get("phase") == "opsd" and line.get("step") == step]
    return {key: value for key, value in line.items() if not key.endswith("_s") and key != "peak_memory_gb"}


def test_two_gpu_run_resumes_to_the_same_end(tmp_path):
    data = write_demo_dataset(tmp_path / "data", rows_per_dataset=8, side=64)
    settings = [
        f"task.root={data}", f"run.output_dir={tmp_path / 'runs'}", "run.device=cuda",
        "run.precision=bf16", "train.activation_checkpointing=true",
        "train.checkpoint_every=1", "train.keep_checkpoints=3", "sampling.visual_thoughts=auto",
        "experiment.noise_control=false", "run.threads=4",
    ]  # fmt: skip
    opsd("run", str(CONFIG), "--nproc-per-node", "2", *[part for item in settings for part in ("--set", item)])
    straight = tmp_path / "runs" / "thinkmorph-debug"
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "opsd" / "checkpoints" / "step-0000003")
    (resumed / "results.json").unlink()
    opsd("run", "--resume", str(resumed), "--nproc-per-node", "2")

    assert step_metrics(resumed, 3) == step_metrics(straight, 3)
    for name in ("student", "teacher"):
        expected = final_weights(straight / "opsd", name, steps=3)
        actual = final_weights(resumed / "opsd", name, steps=3)
        differing = [key for key in expected if not torch.equal(actual[key], expected[key])]
        assert not differing, f"{name}: {len(differing)} tensors differ, e.g. {differing[:3]}"
