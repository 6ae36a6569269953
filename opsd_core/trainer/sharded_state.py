"""The weights and optimizer state of a multi-process run, saved and loaded shard by shard.

Owns: one ``torch.distributed.checkpoint`` state of tensors only, holding the student
(``student.<name>``), the EMA teacher (``teacher.<name>``) and the optimizer's moments
(``optimizer.state.<name>.<moment>``), written into a checkpoint's ``sharded/`` directory by
every rank, each its own shards, and read back on any number of processes (the library
reshards: a rank reads the parts of the saved shards that overlap its own); the optimizer's
parameter groups, plain values, which the caller stores with the trainer state; the check that
a checkpoint's tensors are the models' before anything is loaded. Nothing is gathered: each
rank holds its shards only.
Does not know: the checkpoint directory around ``sharded/`` (``checkpoint.py``), how models
are sharded (the backend's ``parallelize``), the scheduler, RNG streams or the data position.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opsd_core.errors import CheckpointError
from opsd_core.trainer.checkpoint import (
    SHARDED,
    SafeShardedReader,
    sharded_entries,
    sharded_read_in_one_process,
)

ROLES = ("student", "teacher")


def _state(student: torch.nn.Module, teacher: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state to save or to load into: this rank's shards (DTensors) of every tensor, keyed
    by parameter name, and the optimizer's parameter groups (under ``optimizer``'s
    ``param_groups``). Every rank must call it (an optimizer without state takes one zero step
    to create it, as the library does)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "student": get_model_state_dict(student),
        "teacher": get_model_state_dict(teacher),
        "optimizer": get_optimizer_state_dict(student, optimizer),
    }


def optimizer_param_groups(student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimizer's parameter groups as :func:`load_sharded` takes them back: plain values
    (hyperparameters, the names of their parameters), equal on every rank, kept with the
    trainer state rather than in ``sharded/``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(student, optimizer)["param_groups"]


def save_sharded(directory: Path, student: torch.nn.Module, teacher: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write ``directory/sharded/``: every rank its shards of the student, the teacher and the
    optimizer's moments. Every rank must call it with the same ``directory``."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as save_state

    state = _state(student, teacher, optimizer)
    del state["optimizer"]["param_groups"]  # plain values: see optimizer_param_groups
    save_state(state, storage_writer=FileSystemWriter(str(directory / SHARDED)))


def _layout_mismatch(saved: dict[str, tuple[int, ...] | None], state: dict[str, Any]) -> str | None:
    """How the student and teacher tensors of ``state`` differ from the checkpoint's (None when
    every name is there with its shape)."""
    missing, reshaped = [], []
    for role in ROLES:
        for name, tensor in state[role].items():
            key = f"{role}.{name}"
            if key not in saved:
                missing.append(key)
            elif saved[key] != tuple(tensor.shape):  # a DTensor's shape is the full tensor's
                reshaped.append(f"{key} is {list(saved[key])} there, {list(tensor.shape)} here")
    expected = {f"{role}.{name}" for role in ROLES for name in state[role]}
    extra = sorted(key for key in saved if key.split(".", 1)[0] in ROLES and key not in expected)
    if not (missing or reshaped or extra):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing there (e.g. {', '.join(missing[:3])})")
    if extra:
        parts.append(f"{len(extra)} tensors this model lacks (e.g. {', '.join(extra[:3])})")
    if reshaped:
        parts.append(f"{len(reshaped)} of another shape ({'; '.join(reshaped[:2])})")
    return "; ".join(parts)


def load_sharded(
    checkpoint_dir: Path,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    param_groups: list[dict[str, Any]],
) -> None:
    """Fill this rank's shards of the student, the teacher and the optimizer from the checkpoint
    ``checkpoint_dir``, whatever the number of processes that wrote it, with the optimizer's
    ``param_groups`` saved beside it (:func:`optimizer_param_groups`). A checkpoint of other
    models is a CheckpointError before anything is loaded. Every rank must call it.

    Parameters that had no optimizer state when it was saved (never given a gradient) have none
    after loading either, as in the run that saved it.
    """
    from torch.distributed.checkpoint import load as load_state
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    saved = sharded_entries(checkpoint_dir)
    # A fresh optimizer gets its state from one zero step, which the library skips when gradients exist.
    optimizer.zero_grad(set_to_none=True)
    state = _state(student, teacher, optimizer)
    mismatch = _layout_mismatch(saved, state)
    if mismatch:
        raise CheckpointError(
            f"checkpoint {str(checkpoint_dir)!r} holds other models than this run builds: {mismatch}; "
            "resume it with the backend settings it was written with"
        )
    del state["optimizer"]["param_groups"]  # from the trainer state, not the shards
    moments = state["optimizer"]["state"]
    state["optimizer"]["state"] = {
        name: values for name, values in moments.items() if all(f"optimizer.state.{name}.{key}" in saved for key in values)
    }
    reader = SafeShardedReader(str(checkpoint_dir / SHARDED))
    if dist.is_initialized():
        load_state(state, storage_reader=reader)
    else:  # a single process resuming a multi-process checkpoint
        with sharded_read_in_one_process():
            load_state(state, storage_reader=reader, no_dist=True)
    set_model_state_dict(student, state["student"])
    set_model_state_dict(teacher, state["teacher"])
    optimizer_state = {"state": state["optimizer"]["state"], "param_groups": param_groups}
    set_optimizer_state_dict(student, optimizer, optimizer_state, options=StateDictOptions(strict=False))
