"""Where a run executes: processes, devices, threads and precision.

Owns: the one device setting (``run.device``: ``auto`` picks CUDA when there is one), the CPU
threads torch uses (``run.threads``), the autocast precision of forwards (``run.precision``),
joining the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU),
the device mesh of ``train.replicate`` x ``train.shard``, and :class:`Ranks`: this process
among the training processes, with what ranks exchange (slices of a step's problems, metric
averages, broadcasts, gathers). A single process is the world of one: every helper then does
what a single process does.
Does not know: models, how they are sharded (``trainer.sharding``), losses or run directories.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from opsd_core.errors import ConfigError

if TYPE_CHECKING:
    from opsd_core.config import RunConfig

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device: CUDA requested but no CUDA device is available (got {name!r}); use 'cpu' or 'auto'")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(
                f"run.device: this machine has {torch.cuda.device_count()} CUDA device(s) (got {name!r})"
            )
    return torch.device(name)


def apply_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch's intra-op pool (None leaves torch's choice)."""
    if threads:
        torch.set_num_threads(threads)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forwards' precision: bf16 autocast for ``"bf16"`` (master weights stay as they are),
    nothing for ``"fp32"``."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def weight_dtype(precision: str, training: bool) -> torch.dtype:
    """The dtype models are built in: fp32 whenever they train (``bf16`` then means bf16
    forwards over fp32 masters), bf16 for a run that only infers at ``run.precision = "bf16"``."""
    return torch.bfloat16 if precision == "bf16" and not training else torch.float32


def release_cached_memory(device: torch.device) -> None:
    """Return memory that freed tensors left cached (Python's garbage, CUDA's allocator)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory in GB: CUDA memory allocated by torch on a CUDA device, the
    resident set size of the process on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


@dataclass(frozen=True)
class Ranks:
    """This process among the training processes; the default is a single process.

    Attributes:
        rank: this process's global rank.
        world_size: number of training processes.
        mesh: the DeviceMesh models are sharded over (None for a single process).
        device: where tensors exchanged by collectives live (a CUDA device for NCCL).
    """

    rank: int = 0
    world_size: int = 1
    mesh: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes metrics, results and reports, and the one that
        completes each checkpoint (every rank writes its shards into it)."""
        return self.rank == 0

    def share(self, count: int, name: str) -> int:
        """How many of ``count`` items (the config field ``name``) each rank takes."""
        if count % self.world_size:
            raise ConfigError(
                f"{name}: {count} cannot be split evenly over {self.world_size} processes (got {count}); "
                f"use a multiple of {self.world_size}"
            )
        return count // self.world_size

    def local_slice(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (rank r takes the r-th block)."""
        size = len(items) // self.world_size
        return list(items[self.rank * size : (self.rank + 1) * size])

    def mean(self, values: dict[str, float], skip: Sequence[str] = ()) -> dict[str, float]:
        """``values`` averaged over ranks, except the keys in ``skip`` (equal on every rank)."""
        if not self.distributed:
            return values
        keys = [key for key in values if key not in skip]
        totals = torch.tensor([float(values[key]) for key in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        means = dict(zip(keys, (totals / self.world_size).tolist()))
        return {key: means.get(key, value) for key, value in values.items()}

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (a picklable object made by this program)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_world_size() -> int:
    """Number of processes the launcher (torchrun) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def mesh_shape(world_size: int, replicate: int, shard: int | None) -> tuple[int, int]:
    """(replicate, shard) group sizes for ``world_size`` processes; ``shard`` None means
    ``world_size // replicate``. A bad combination is a ConfigError naming the fields."""
    if world_size % replicate:
        raise ConfigError(
            f"train.replicate: {world_size} processes cannot form {replicate} equal replica groups "
            f"(got {replicate}); use a divisor of {world_size}"
        )
    shard = world_size // replicate if shard is None else shard
    if replicate * shard != world_size:
        raise ConfigError(
            f"train.shard: replicate x shard must equal the number of processes, {world_size} "
            f"(got replicate = {replicate}, shard = {shard}); set shard = {world_size // replicate} or leave it unset"
        )
    return replicate, shard


@contextlib.contextmanager
def process_group(config: RunConfig, device: torch.device) -> Iterator[Ranks]:
    """Join the process group torchrun started this process in, build the device mesh, and
    leave the group at the end of the block.

    Run directly (``WORLD_SIZE`` unset or 1) this is the single process, with no process group;
    ``train.replicate`` and ``train.shard`` are then not used. Otherwise the backend is NCCL on
    CUDA (each process on the GPU ``LOCAL_RANK``) and gloo on CPU; the mesh is 1-D ("shard",
    plain FSDP) when ``replicate`` is 1, else 2-D ("replicate", "shard") for HSDP.
    """
    world_size = launched_world_size()
    if world_size == 1:
        yield Ranks(device=device)
        return
    replicate, shard = mesh_shape(world_size, config.train.replicate, config.train.shard)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    joined_here = not dist.is_initialized()
    if joined_here:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    from torch.distributed.device_mesh import init_device_mesh

    try:
        if replicate == 1:
            mesh = init_device_mesh(device.type, (shard,), mesh_dim_names=("shard",))
        else:
            mesh = init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
        yield Ranks(dist.get_rank(), world_size, mesh, device)
    finally:
        if joined_here:
            dist.destroy_process_group()
