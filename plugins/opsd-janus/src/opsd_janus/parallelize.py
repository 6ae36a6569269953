"""FSDP2 for Janus: how ``JanusForConditionalGeneration`` is sharded over a device mesh.

Owns: which modules become FSDP units and why. The backend never calls ``model(...)``; it
calls submodules directly (the token embedding, the vision tower and aligner, the Llama stack,
``lm_head``, the generation embedding/aligner/head, the VQ model). So every LLM decoder layer
and every ViT layer is a unit, and so is each directly called submodule, holding whatever
parameters its layers leave over; a tied ``lm_head`` shares one unit with the embedding. The
root is initialised by one forward at the end (see :func:`initialize_from_root`). Also:
HSDP when the mesh is 2-D (replicate x shard), bf16 compute with fp32 gradient reduction, and
activation checkpointing of decoder and ViT layers.
Does not know: how the mesh was built, the training loop, losses, optimizers or checkpoints.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from opsd_core.api.backend import checkpoint_forward, mixed_precision_policy



def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's and the vision encoder's layers: FSDP units and the layers
    activation checkpointing recomputes (in one-process runs too)."""
    janus = model.model
    return [*janus.language_model.layers, *janus.vision_model.encoder.layers]


def parallelize_janus(model: torch.nn.Module, mesh: Any, config: Any) -> torch.nn.Module:
    """Shard ``model`` (a ``JanusForConditionalGeneration``) over ``mesh`` in place and return it.

    Args:
        model: the unsharded model on this rank's device; its weights become the master weights.
        mesh: a 1-D DeviceMesh (FSDP) or a 2-D one with dimensions (replicate, shard) (HSDP).
        config: the run config; reads ``run.precision`` ("fp32" or "bf16") and
            ``train.activation_checkpointing``.

    Every unit frees its gathered parameters after each forward: the teacher never runs
    backward, and the EMA update and checkpoints read the sharded parameters between steps.
    """
    policy = mixed_precision_policy(config.run.precision, mesh.device_type)
    janus = model.model
    layers = transformer_layers(model)
    if config.train.activation_checkpointing:
        for layer in layers:
            checkpoint_forward(layer)
    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for layer in layers:
        shard(layer)
    embedding = janus.language_model.embed_tokens
    if model.lm_head.weight is embedding.weight:
        shard([embedding, model.lm_head])
    else:
        shard(embedding)
        shard(model.lm_head)
    for module in (
        janus.language_model,
        janus.vision_model,
        janus.aligner,
        janus.generation_embeddings,
        janus.generation_aligner,
        janus.generation_head,
        janus.vqmodel,
    ):
        shard(module)
    register_fsdp_forward_method(janus.vqmodel, "decode")  # visual thoughts call decode, not forward
    shard(model)
    initialize_from_root(model)
    return model


def initialize_from_root(model: torch.nn.Module) -> None:
    """Run one token through ``model.forward`` so that FSDP sets itself up from the root.

    FSDP2 initialises lazily, at the first forward, and requires that forward to be the
    root's; the backend then calls the units directly (torch >= 2.10 lets any initialised unit
    start an iteration), which without this would initialise the first unit called as a root
    of its own and fail at the next one.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
