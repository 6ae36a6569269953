"""FSDP2 for Emu3: how the model is sharded over a device mesh.

Owns: which modules become FSDP units (each text decoder layer; the VQ-VAE, whose ``encode``
and ``decode`` the backend calls outside the model's forward; then the root, which keeps the
embeddings, final norm and ``lm_head``, and is initialised by one forward at the end), HSDP when the mesh is 2-D (replicate x shard), the bf16
mixed-precision policy with fp32 gradient reduction, and activation checkpointing of decoder
layers.
Does not know: how the mesh was built, the training loop, losses or checkpoints. The model
stays a plain transformers module; everything FSDP-specific happens here, in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from opsd_core.api.backend import checkpoint_forward, mixed_precision_policy



def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The text model's decoder layers: FSDP units and the layers activation checkpointing
    recomputes (in one-process runs too)."""
    return list(model.model.text_model.layers)


def parallelize_emu3(model: torch.nn.Module, mesh: Any, config: Any) -> torch.nn.Module:
    """Shard ``model`` (an Emu3ForConditionalGeneration) over ``mesh`` with FSDP2, in place, and return it.

    Args:
        model: the unsharded model on this rank's device.
        mesh: a 1-D DeviceMesh (FSDP) or a 2-D one with dimensions (replicate, shard) (HSDP).
        config: the run config; reads ``run.precision`` ("fp32" or "bf16") and
            ``train.activation_checkpointing``.

    Every unit frees its gathered parameters after each forward: the teacher never runs
    backward, and the EMA update and checkpoints read sharded parameters between steps.
    """
    policy = mixed_precision_policy(config.run.precision, mesh.device_type)
    layers = transformer_layers(model)
    if config.train.activation_checkpointing:
        for layer in layers:
            checkpoint_forward(layer)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    vq = model.model.vqmodel
    fully_shard(vq, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for name in ("encode", "decode"):
        register_fsdp_forward_method(vq, name)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    model.set_reshard_after_forward(True, recurse=False)
    initialize_from_root(model)
    return model


def initialize_from_root(model: torch.nn.Module) -> None:
    """Run one token through the root so that FSDP sets every unit up from it.

    FSDP2 initialises lazily at the first forward and requires that forward to be the root's.
    The backend VQ-encodes a context's images (``vqmodel.encode``) before the model's own
    forward, which would otherwise make the VQ-VAE a root of its own and fail at the next call.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
