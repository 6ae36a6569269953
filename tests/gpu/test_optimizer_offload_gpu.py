"""Optimizer-state offload on CUDA (``pytest -m gpu``): the same updates as AdamW on the device,
the moments in pinned host memory between steps and off the device.

The tiny UMM trains three steps on the GPU twice, with and without ``train.optimizer_offload``
(in chunks small enough that a step moves several of them); student and EMA teacher weights
must be bit-identical, and between steps the offloaded run's moments are in pinned host
memory while the plain run's are on the device.
"""

from pathlib import Path

import pytest
import torch

from opsd_core.components import build_components
from opsd_core.config import load_config
from opsd_core.rundir import MetricsLog
from opsd_core.trainer.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"
SMALL = [
    "train.samples_per_step=8",
    "train.grad_accum=1",
    "schedule.total_steps=3",
    "schedule.warmup_steps=1",
    "train.checkpoint_every=0",
    "sampling.max_completion_tokens=12",
]


def _trainer(tmp_path: Path, name: str, *overrides: str) -> Trainer:
    config = load_config(QUICKSTART, [*SMALL, *overrides])
    components = build_components(config)
    torch.manual_seed(0)
    student = components.backend.build_model().to("cuda")
    trainer = Trainer(components, student, tmp_path / name, MetricsLog(tmp_path / f"{name}.jsonl"))
    if trainer.state_offload is not None:
        trainer.state_offload.chunk_bytes = 1 << 16
    return trainer


def test_offloaded_adamw_on_cuda_gives_bit_identical_updates(tmp_path):
    plain = _trainer(tmp_path, "plain")
    offloaded = _trainer(tmp_path, "offloaded", "train.optimizer_offload=true")
    for _ in range(3):
        assert plain.train_step()["loss"] == offloaded.train_step()["loss"]
    for name in ("student", "teacher"):
        expected = getattr(plain, name).state_dict()
        for key, value in getattr(offloaded, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name} {key}"
    moments = [v for state in offloaded.optimizer.state.values() for v in state.values() if v.dim() > 0]
    assert moments and all(v.device.type == "cpu" and v.is_pinned() for v in moments)
    on_device = [v for state in plain.optimizer.state.values() for v in state.values() if v.dim() > 0]
    assert all(v.is_cuda for v in on_device)
