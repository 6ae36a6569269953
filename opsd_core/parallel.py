"""FSDP2 building blocks for backends' ``parallelize``: the precision policy, activation
checkpointing and whole parameters outside a forward, the same for every model family.

Owns: what ``run.precision`` means to FSDP (``bf16``: bf16 compute and all-gathers, fp32
master weights and gradient reduction, CUDA only), how a layer recomputes its activations, and
how a loss reads a sharded parameter whole (e.g. the fused loss's ``lm_head`` weight) with its
gradient reduced as FSDP reduces the others.
Does not know: which modules a backend makes FSDP units (that is each backend's
``parallelize.py``), meshes or the training loop.
"""

from __future__ import annotations

import functools

import torch

from opsd_core.errors import ConfigError


def mixed_precision_policy(precision: str, device_type: str):
    """The ``MixedPrecisionPolicy`` of ``run.precision``: bf16 compute with fp32 gradient
    reduction for ``"bf16"`` (CUDA meshes only), no casts for ``"fp32"``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    if precision != "bf16":
        raise ConfigError(f"run.precision: unknown precision (got {precision!r}); use 'fp32' or 'bf16'")
    if device_type != "cuda":
        raise ConfigError(
            f"run.precision: 'bf16' in a multi-process run needs CUDA devices (got a {device_type!r} mesh); "
            "use 'fp32' on CPU"
        )
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def checkpoint_forward(layer: torch.nn.Module) -> None:
    """Recompute ``layer``'s activations in backward instead of storing them.

    The instance's ``forward`` is wrapped rather than the module, so parameter names (checkpoint
    keys, the EMA's student-teacher pairing) stay as they are. Without grad (sampling, the
    teacher) there is nothing to recompute and the layer runs as is.
    """
    from torch.utils.checkpoint import checkpoint

    forward = layer.forward

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = recomputed


def whole_parameter(parameter: torch.Tensor) -> torch.Tensor:
    """The whole of ``parameter`` where FSDP2 holds only this rank's shard of it (a DTensor);
    any other tensor as it is.

    For a loss that multiplies by a parameter outside the model's forward methods (the fused
    loss and the (V, D) ``lm_head`` weight), where FSDP has resharded it. The shards are
    gathered in the parameter's own dtype (the fp32 master weights under bf16 mixed precision,
    as a single-process run hands them to the loss). With grad enabled the result is
    differentiable: the gradient each rank computes from its own samples is summed over every
    rank of the mesh and divided by their number, and this rank's rows reach the shard's
    ``.grad``. That is the average FSDP takes of the gradients it reduces itself, so the step
    equals the single-process one.
    """
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(parameter, DTensor):
        return parameter
    mesh = parameter.device_mesh
    if not (parameter.requires_grad and torch.is_grad_enabled()):
        return parameter.full_tensor()
    whole = parameter.full_tensor(grad_placements=[Partial("sum")] * mesh.ndim)
    ranks = mesh.size()
    whole.register_hook(lambda grad: grad / ranks)
    return whole
