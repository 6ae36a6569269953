"""``opsd run --nnodes 2``: two launchers, each a "node" of one process on 127.0.0.1, meet through
torchrun's c10d rendezvous and train the debug flavour on CPU (gloo).

The run must be bit-equal (per-step metrics, final sharded student and teacher) to the same two
processes launched on one node with ``--nproc-per-node 2``, and within the FSDP tolerances of
:mod:`opsd_core.testing.fsdp` of the single-process run. OPSD only (no noise control), 2 steps,
the stored visual thoughts (no drawing), so the three runs take about a minute together.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsd_core.api import load_config
from opsd_core.testing import fsdp
from opsd_core.testing.runs import run_config_file
from opsd_core.testing.trainer import build_components
from opsd_thinkmorph.demo_data import write_demo_dataset

pytestmark = pytest.mark.multiprocess

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "thinkmorph-debug.toml"
STEPS = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("two-nodes")
    data = write_demo_dataset(root / "data", rows_per_dataset=8, side=64)
    overrides = [
        f"task.root='{data}'", f"schedule.total_steps={STEPS}", "run.threads=1", "sampling.visual_thoughts='stored'",
        "eval.limit=2", "diagnostics.kl_samples=2", "experiment.noise_control=false",
        f"optim.lr={fsdp.LR}", f"optim.eps={fsdp.ADAM_EPS}",
    ]  # fmt: skip
    single = run_config_file(EXAMPLE, root / "single", overrides).directory
    one_node = run_config_file(EXAMPLE, root / "one-node", overrides, arguments=["--nproc-per-node", "2"]).directory

    port = _free_port()
    command = [
        sys.executable, "-c", "from opsd_core.cli import main; main()", "run", str(EXAMPLE), "--no-progress",
        *[part for item in [f"run.output_dir={json.dumps(str(root / 'two-nodes'))}", *overrides] for part in ("--set", item)],
        "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "120",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen([*command, "--node-rank", str(rank)], env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (1, 0)  # node 1 first: it waits for node 0 to answer
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-6000:]
    return {"single": single, "one-node": one_node, "two-nodes": root / "two-nodes" / single.name}


def _weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    def backend():
        return build_components(load_config(run / "config.toml"), training=False).backend

    return fsdp.final_weights(run / "opsd", name, STEPS, build_backend=backend)


def test_two_nodes_equal_two_processes_on_one_node(runs):
    assert (runs["two-nodes"] / "opsd" / "checkpoints" / f"step-{STEPS:07d}" / "sharded").is_dir()
    assert fsdp.step_metrics(runs["two-nodes"], STEPS) == fsdp.step_metrics(runs["one-node"], STEPS)
    for name in ("student", "teacher"):
        want, got = _weights(runs["one-node"], name), _weights(runs["two-nodes"], name)
        assert want.keys() == got.keys()
        assert all(torch.equal(got[key], want[key]) for key in want), name


def test_two_nodes_equal_one_process_within_the_fsdp_tolerance(runs):
    for step, (want, got) in enumerate(zip(fsdp.step_metrics(runs["single"], STEPS), fsdp.step_metrics(runs["two-nodes"], STEPS)), 1):
        assert got == pytest.approx(want, rel=fsdp.METRIC_RTOL, abs=fsdp.METRIC_ATOL), f"step {step}"
    for name in ("student", "teacher"):
        want, got = _weights(runs["single"], name), _weights(runs["two-nodes"], name)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=fsdp.WEIGHT_RTOL, atol=fsdp.WEIGHT_ATOL, msg=f"{name} {key}")
