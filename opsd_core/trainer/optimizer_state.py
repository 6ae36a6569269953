"""A single-process checkpoint's optimizer state, loaded into one process or into shards.

Owns: the optimizer's state as a single process's ``optimizer.state_dict()`` has it (full
tensors keyed by parameter index), loaded as it is in one process or, in a multi-process run
resuming such a checkpoint, read by rank 0 and scattered to the sharded (FSDP2) parameters.
Multi-process checkpoints hold their optimizer state sharded (``sharded_state.py``).
Does not know: the checkpoint directory layout, the model family or the loss.
"""

from __future__ import annotations

from typing import Any

import torch

from opsd_core.runtime import Ranks
from opsd_core.trainer.sharding import full_state_options


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the indices of its state dict)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def load_optimizer_state_dict(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any] | None,
    ranks: Ranks,
) -> None:
    """Load a single process's ``optimizer.state_dict()``; when sharded, rank 0's copy is the
    one used and every rank takes its shards. Every rank must call it."""
    if not ranks.distributed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name: dict[str, Any] = {}
    if ranks.is_main:
        names = _parameter_names(model, optimizer)
        by_name = {
            "state": {names[position]: value for position, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
        }
    # Parameters that never had a gradient (e.g. unused generation experts) have no state.
    options = full_state_options(broadcast_from_rank0=True, strict=False)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
