"""Sharded models: FSDP2 copies, gathering and moving full weights to and from rank 0.

Owns: sharding a model with the backend's ``parallelize`` and keeping a weightless skeleton
of it, the start model built on rank 0 and scattered as shards, clones made shard by shard,
gathering every weight for sampling (:func:`gathered`), the global gradient norm, and moving
full (unsharded) weights between rank 0 and sharded modules (the start model, a
single-process checkpoint resumed on several processes). In a single process every helper
passes the model through.
Does not know: how a model is sharded (the backend's ``parallelize`` decides), losses, the
checkpoint directory layout or config files.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from opsd_core.runtime import Ranks, release_cached_memory

if TYPE_CHECKING:
    from opsd_core.config import RunConfig
    from opsd_core.interfaces import Backend

def shard(backend: Backend, model: torch.nn.Module, ranks: Ranks, config: RunConfig):
    """``(model, skeleton)``: the model sharded by ``backend.parallelize`` and a weightless
    copy of it taken before (see :func:`load_unsharded`). A single process
    gets ``(model, None)`` untouched."""
    if not ranks.distributed:
        return model, None
    skeleton = meta_skeleton(model)
    return backend.parallelize(model, ranks.mesh, config), skeleton


def build_start(backend: Backend, config: RunConfig, ranks: Ranks, device: torch.device):
    """``(start, skeleton)``: the start checkpoint's model, which takes no gradient, and a
    weightless unsharded copy of it (None in a single process).

    A single process builds the model on ``device``. Several processes get it sharded by
    ``backend.parallelize`` when the backend declares the ``meta_skeleton`` capability:
    only rank 0 builds (or loads) the weights and every rank receives its shards from it, so
    no other rank ever holds the whole model. A backend without a skeleton gets what a single
    process gets, on every rank, with skeleton None: the whole start model, which the trainer
    copies and shards (its ``parallelize`` may then run the model, e.g. to initialise FSDP
    from the root). Every rank must call it.
    """
    skeleton = backend.model_skeleton() if ranks.distributed and backend.capabilities.meta_skeleton else None
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
    set_model_state_dict(start, state, options=full_state_options(broadcast_from_rank0=True))
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


def full_state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def unsharded_copy(model: torch.nn.Module, skeleton: torch.nn.Module | None, ranks: Ranks) -> torch.nn.Module | None:
    """The model with all its weights, as the backend saves it: ``model`` itself in a single
    process; else a CPU copy on rank 0 (None elsewhere) built from ``skeleton``. Every rank
    must call it (the weights are gathered)."""
    if skeleton is None:
        return model
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=full_state_options(cpu_offload=True))
    if not ranks.is_main:
        return None
    full = copy.deepcopy(skeleton)
    full.load_state_dict(state, strict=True, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers are not in the state dict
        owner, _, attribute = name.rpartition(".")
        setattr(full.get_submodule(owner), attribute, buffer.detach().cpu())
    return full


def load_unsharded(
    model: torch.nn.Module,
    skeleton: torch.nn.Module | None,
    ranks: Ranks,
    load: Callable[[torch.nn.Module], None],
    partial: bool = False,
) -> None:
    """Fill ``model`` by ``load`` (e.g. the backend's ``load_weights``): directly in a single
    process; else rank 0 loads into a CPU copy built from ``skeleton`` and every rank takes its
    shards from it. With ``partial`` (``load`` fills some tensors only), that copy starts as
    ``model``'s current weights, gathered. Every rank must call it."""
    if skeleton is None:
        load(model)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    state: dict[str, torch.Tensor] = {}
    current = unsharded_copy(model, skeleton, ranks) if partial else None
    if ranks.is_main:
        full = current if current is not None else copy.deepcopy(skeleton).to_empty(device="cpu")
        load(full)
        state = full.state_dict()
    set_model_state_dict(model, state, options=full_state_options(broadcast_from_rank0=True))
