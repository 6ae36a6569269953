"""Multi-process training: the process group, the device mesh and what the trainer exchanges.

Owns: joining the process group torchrun describes in the environment (NCCL on CUDA, gloo on
CPU), the device mesh of ``train.replicate`` x ``train.shard``, each rank's slice of a step's
problems, metric averages over ranks, gathering a sharded model's weights for sampling, the
global gradient norm, and moving full (unsharded) weights and optimizer state between rank 0
and sharded modules, so checkpoints have one layout whatever the number of processes.
A single process is the world of one: every helper then does exactly what the trainer did
before it knew of ranks.
Does not know: how a model is sharded (the backend's ``parallelize`` decides), losses, the
checkpoint directory layout or config files.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from opsd_core.errors import ConfigError

if TYPE_CHECKING:
    from opsd_core.config import RunConfig
    from opsd_core.interfaces import Backend

T = TypeVar("T")


# ---------------------------------------------------------------------------------------- ranks
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
        """Rank 0: the only process that writes metrics, results, reports and checkpoints."""
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


# ---------------------------------------------------------------------------------------- sharded models
def shard(backend: Backend, model: torch.nn.Module, ranks: Ranks, config: RunConfig):
    """``(model, skeleton)``: the model sharded by ``backend.parallelize`` and a weightless
    copy of it taken before, for checkpoints (see :func:`unsharded_copy`). A single process
    gets ``(model, None)`` untouched."""
    if not ranks.distributed:
        return model, None
    skeleton = meta_skeleton(model)
    return backend.parallelize(model, ranks.mesh, config), skeleton


def build_start(backend: Backend, config: RunConfig, ranks: Ranks, device: torch.device):
    """``(start, skeleton)``: the start checkpoint's model, which takes no gradient, and a
    weightless unsharded copy of it (None in a single process).

    A single process builds the model on ``device``. Several processes get it sharded by
    ``backend.parallelize`` when the backend offers :meth:`~opsd_core.interfaces.Backend.model_skeleton`:
    only rank 0 builds (or loads) the weights and every rank receives its shards from it, so
    no other rank ever holds the whole model. A backend without a skeleton gets what a single
    process gets, on every rank, with skeleton None: the whole start model, which the trainer
    copies and shards (its ``parallelize`` may then run the model, e.g. to initialise FSDP
    from the root). Every rank must call it.
    """
    skeleton = backend.model_skeleton() if ranks.distributed else None
    if skeleton is None:
        return backend.build_model().to(ranks.device if ranks.distributed else device).requires_grad_(False), None
    full = backend.build_model().to(ranks.device) if ranks.is_main else None
    mismatch = ranks.broadcast(_skeleton_mismatch(skeleton, full) if full is not None else None)
    if mismatch:
        raise ValueError(f"{type(backend).__name__}.model_skeleton does not match build_model: {mismatch}")
    start = backend.parallelize(copy.deepcopy(skeleton).requires_grad_(False), ranks.mesh, config)
    start.to_empty(device=ranks.device)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state = full.state_dict() if full is not None else {}
    set_model_state_dict(start, state, options=_full_options(broadcast_from_rank0=True))
    # Buffers outside the state dict (recomputed tables) come from rank 0 as well.
    persistent = set(start.state_dict())
    sources = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in start.named_buffers():
        if name not in persistent:
            if full is not None:
                buffer.copy_(sources[name])
            dist.broadcast(buffer, src=0)
    del full, state, sources
    release_cached_memory(ranks.device)
    return start, skeleton


def _skeleton_mismatch(skeleton: torch.nn.Module, full: torch.nn.Module) -> str | None:
    """What differs between the tensors of ``skeleton`` and ``full`` (None when nothing does)."""

    def described(module: torch.nn.Module) -> dict[str, tuple]:
        tensors = itertools.chain(module.named_parameters(), module.named_buffers())
        return {name: (tuple(t.shape), t.dtype, t.requires_grad) for name, t in tensors}

    expected, got = described(full), described(skeleton)
    if expected == got:
        return None
    names = sorted(expected.keys() ^ got.keys())
    if names:
        return f"tensors present in only one of them: {', '.join(names[:5])}"
    wrong = [f"{name}: {got[name]} instead of {expected[name]}" for name in expected if expected[name] != got[name]]
    return "; ".join(wrong[:4])


def release_cached_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def local_tensors(model: torch.nn.Module, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """This rank's part of every parameter and buffer of a (sharded) ``model``, copied to
    ``device``: what :func:`sharded_clone` needs to rebuild it, at 1/shards of its size."""
    from torch.distributed.tensor import DTensor

    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return {
        name: (t.to_local() if isinstance(t, DTensor) else t).detach().to(device, copy=True) for name, t in tensors
    }


def sharded_clone(
    source: torch.nn.Module | dict[str, torch.Tensor],
    skeleton: torch.nn.Module,
    backend: Backend,
    ranks: Ranks,
    config: RunConfig,
) -> torch.nn.Module:
    """A new sharded model laid out as ``skeleton`` (its dtypes, its ``requires_grad``) holding
    the weights of ``source``: a model sharded the same way, or its :func:`local_tensors`.

    Each rank copies its own shards; nothing is gathered, so a clone costs one shard of memory
    per rank. Every rank must call it (``parallelize`` may communicate).
    """
    from torch.distributed.tensor import DTensor

    clone = backend.parallelize(copy.deepcopy(skeleton), ranks.mesh, config)
    clone.to_empty(device=ranks.device)
    if isinstance(source, torch.nn.Module):
        source = dict(itertools.chain(source.named_parameters(), source.named_buffers()))
    with torch.no_grad():
        for name, target in itertools.chain(clone.named_parameters(), clone.named_buffers()):
            value = source[name]
            value = value.to_local() if isinstance(value, DTensor) else value
            (target.to_local() if isinstance(target, DTensor) else target).copy_(value)
    return clone


def meta_skeleton(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, torch.nn.Parameter):
            meta = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(module, memo)


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every rank holds all of ``model``'s weights inside the block, and running the model
    exchanges nothing.

    For sampling and evaluation: each rank decodes its own rows for as many steps as they
    need, which would deadlock if every layer gathered its shard at every step. One all-gather
    on entry, freed on exit; afterwards every unit reshards after forward again, the setting
    ``Backend.parallelize`` implementations are expected to choose. A module that is not
    sharded passes through.
    """
    units = _fsdp_modules(model)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def clip_grad_norm(parameters: Sequence[torch.Tensor], max_norm: float | None) -> float:
    """The global gradient norm of sharded (DTensor) gradients, which are scaled so it is at
    most ``max_norm`` when that is given."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return float(norm)


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def unsharded_copy(model: torch.nn.Module, skeleton: torch.nn.Module | None, ranks: Ranks) -> torch.nn.Module | None:
    """The model with all its weights, as the backend saves it: ``model`` itself in a single
    process; else a CPU copy on rank 0 (None elsewhere) built from ``skeleton``. Every rank
    must call it (the weights are gathered)."""
    if skeleton is None:
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    if not ranks.is_main:
        return None
    full = copy.deepcopy(skeleton)
    full.load_state_dict(state, strict=True, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers are not in the state dict
        owner, _, attribute = name.rpartition(".")
        setattr(full.get_submodule(owner), attribute, buffer.detach().cpu())
    return full


def load_unsharded(
    model: torch.nn.Module, skeleton: torch.nn.Module | None, ranks: Ranks, load: Callable[[torch.nn.Module], None]
) -> None:
    """Fill ``model`` by ``load`` (e.g. the backend's ``load_weights``): directly in a single
    process; else rank 0 loads into a CPU copy built from ``skeleton`` and every rank takes its
    shards from it. Every rank must call it."""
    if skeleton is None:
        load(model)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state: dict[str, torch.Tensor] = {}
    if ranks.is_main:
        full = copy.deepcopy(skeleton).to_empty(device="cpu")
        load(full)
        state = full.state_dict()
    set_model_state_dict(model, state, options=_full_options(broadcast_from_rank0=True))


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the indices of its state dict)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ranks: Ranks
) -> dict[str, Any] | None:
    """The optimizer's state as a single process's ``optimizer.state_dict()`` has it (full
    tensors, keyed by parameter index): rank 0 gets it when sharded, other ranks None."""
    if not ranks.distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not ranks.is_main:
        return None
    index = {name: position for position, name in enumerate(_parameter_names(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]],
    }


def load_optimizer_state_dict(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any] | None,
    ranks: Ranks,
) -> None:
    """Load a state written by :func:`optimizer_state_dict`; when sharded, rank 0's copy is
    the one used and every rank takes its shards. Every rank must call it."""
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
    options = _full_options(broadcast_from_rank0=True, strict=False)
    set_optimizer_state_dict(model, optimizer, by_name, options=options)
