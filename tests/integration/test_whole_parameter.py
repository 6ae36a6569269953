"""``whole_parameter`` on a weight FSDP2 shards unevenly over 2 processes (gloo): a loss that
multiplies by the whole weight outside the module's forward trains it exactly as one process.

Each of the 2 processes takes one of 2 inputs and computes its loss from the whole (7, 5)
weight of a sharded linear layer (rows 4 + 3), together with a loss through the module's own
forward (whose gradient FSDP reduces itself); the single process takes both inputs, each loss
divided by 2 as the trainer divides by the step's samples. After one SGD step the weights,
gathered, must equal the single process's to float64 rounding.

The 2-process run executes this file as a torchrun script (``test_whole_parameter.py OUT``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from opsd_core.parallel import whole_parameter
from opsd_core.testing import fsdp


def model() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 7, bias=False)).double()


def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def step(network: torch.nn.Module, batch: torch.Tensor, samples: int) -> None:
    """One SGD step on the loss of ``batch`` (B, 3, 4): the head applied outside the forward."""
    through_forward = network(batch).sum()
    hidden = network[1](network[0](batch))  # (B, 3, 5)
    head = whole_parameter(network[2].weight)  # (7, 5)
    loss = ((hidden @ head.T).square().sum() + through_forward) / samples
    loss.backward()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter -= 0.1 * parameter.grad


def worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        network = model()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(network[0], mesh=mesh)  # its own unit: called alone below
        fully_shard(network, mesh=mesh)
        network.set_reshard_after_forward(True, recurse=False)  # the head is sharded after the forward
        assert type(network[2].weight).__name__ == "DTensor"
        step(network, inputs()[rank : rank + 1], 1)
        weights = {name: value.full_tensor() for name, value in network.state_dict().items()}
        if rank == 0:
            torch.save(weights, out / "sharded.pt")
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


def test_a_plain_tensor_is_returned_as_it_is():
    tensor = torch.ones(3)
    assert whole_parameter(tensor) is tensor


@pytest.mark.multiprocess
def test_an_unevenly_sharded_weight_trains_as_in_one_process(tmp_path):
    fsdp.run_torchrun(__file__, tmp_path)
    single = model()
    step(single, inputs(), 2)
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-12, atol=1e-14, msg=name)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
