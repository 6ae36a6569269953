"""FSDP2 building blocks for backends' ``parallelize``: the precision policy and activation
checkpointing, the same for every model family.

Owns: what ``run.precision`` means to FSDP (``bf16``: bf16 compute and all-gathers, fp32
master weights and gradient reduction, CUDA only) and how a layer recomputes its activations.
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
