"""FSDP2 for the BAGEL model: how ThinkMorph is sharded over a device mesh.

Owns: which modules become FSDP units (each LLM decoder layer, each ViT layer, then the root,
which keeps the embeddings, connector, final norms, ``lm_head`` and the generation heads), HSDP
when the mesh is 2-D (replicate x shard), the bf16 mixed-precision policy with fp32 master
weights and fp32 gradient reduction, activation checkpointing of decoder and ViT layers, and
which of :class:`~opsd_thinkmorph.model.Bagel`'s methods FSDP treats as forwards.
Does not know: how the mesh was built, the training loop, losses, optimizers or checkpoints.
The model code stays single-device; everything FSDP-specific happens here, in place.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

from opsd_core.api.backend import checkpoint_forward, mixed_precision_policy

from opsd_thinkmorph.model import Bagel

# Bagel is never called as ``model(...)``: the backend calls these methods on the root, so FSDP
# must gather the root's parameters around each of them. None of them calls another.
ROOT_FORWARDS = ("input_embeddings", "llm_forward", "lm_logits", "velocity")


def transformer_layers(model: Bagel) -> list:
    """The LLM decoder layers and ViT layers: FSDP units and the layers activation
    checkpointing recomputes (in one-process runs too)."""
    return [*model.language_model.model.layers, *model.vit_model.vision_model.encoder.layers]


def parallelize_bagel(model: Bagel, mesh: Any, config: Any) -> Bagel:
    """Shard ``model`` over ``mesh`` with FSDP2, in place, and return it.

    Args:
        model: the unsharded model on this rank's device; its weights become the master
            weights (fp32 unless the backend's dtype says otherwise).
        mesh: a 1-D DeviceMesh (FSDP: shard over all its ranks) or a 2-D one with dimensions
            (replicate, shard) (HSDP: shard within a group, replicate across groups).
        config: the run config; reads ``run.precision`` ("fp32" or "bf16") and
            ``train.activation_checkpointing``.

    Every unit, the root included, frees its gathered parameters after each forward: the
    teacher never runs backward (where FSDP would free them), and the trainer's EMA update
    and checkpoints read the sharded parameters between steps.
    """
    policy = mixed_precision_policy(config.run.precision, mesh.device_type)
    layers = transformer_layers(model)
    if config.train.activation_checkpointing:
        for layer in layers:
            checkpoint_forward(layer)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    model.set_reshard_after_forward(True, recurse=False)  # else FSDP keeps the root gathered
    for name in ROOT_FORWARDS:
        register_fsdp_forward_method(model, name)
    return model
