"""The checkpoint reader of export on a ``torch.distributed.checkpoint`` directory written by 2
FSDP2 processes (gloo): each process writes only its shards, and the reader, in one process,
returns the whole tensors under the model's parameter names.

The 2-process save executes this file as a torchrun script (``test_checkpoint_reader.py OUT``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from opsd_core.testing import fsdp
from opsd_core.trainer.checkpoint import read_model_state


def model() -> torch.nn.Module:
    """A seeded two-layer model with rows that do not split evenly over 2 ranks."""
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 7, bias=False)).double()


def worker(out: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    try:
        sharded = model()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(sharded[0], mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        assert type(sharded[2].weight).__name__ == "DTensor"
        dcp.save(sharded.state_dict(), checkpoint_id=str(out / "student"))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_a_checkpoint_written_by_two_processes_is_read_whole(tmp_path):
    fsdp.run_torchrun(__file__, tmp_path)
    assert len(list((tmp_path / "student").glob("*.distcp"))) == 2
    state = read_model_state(tmp_path, "student")
    expected = model().state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert type(state[name]) is torch.Tensor and torch.equal(state[name], tensor), name


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
