"""Janus checkpoints on disk, in the Hugging Face layout.

Owns: which files make a checkpoint directory (``config.json``, ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``, the tokenizer files,
``preprocessor_config.json``), reading them into a model with a clear error for anything
missing or mismatched, and writing a model so that the same code (or transformers'
``from_pretrained``) loads it alone, in our writer or in transformers' own (for export). Parameter names are transformers' own
(``model.language_model.layers.0...``, ``lm_head.weight``): no renaming.
Does not know: contexts, sampling or training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opsd_core.api import state_dicts

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
EXPECTED_FILES = (
    "config.json, model.safetensors (or shards with model.safetensors.index.json), tokenizer.json, "
    "tokenizer_config.json and preprocessor_config.json"
)


def require_checkpoint(directory: Path) -> None:
    """Raise FileNotFoundError naming what belongs in ``directory`` when it is not a checkpoint."""
    missing = state_dicts.missing_files(directory, ("config.json", "tokenizer_config.json", (WEIGHTS, INDEX)))
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a Janus-Pro checkpoint in the Hugging Face layout: missing {', '.join(missing)}. "
            f"It must hold {EXPECTED_FILES} (e.g. a local copy of deepseek-community/Janus-Pro-1B)."
        )


def load_into(model: torch.nn.Module, directory: Path) -> None:
    """Copy the weights of ``directory`` (one file or index + shards) into ``model``: every
    parameter and persistent buffer, tied duplicates excepted. Raise
    :class:`~opsd_core.api.state_dicts.WeightsMismatchError` (a ValueError) listing missing and
    unexpected keys and shape mismatches."""
    directory = Path(directory)
    state_dicts.load_into(model, state_dicts.read_weights(directory), f"{directory} (this Janus config)")


def save_checkpoint(model: torch.nn.Module, directory: Path) -> None:
    """Write ``model``'s config and weights (one safetensors file, tied duplicates dropped)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(directory))
    state_dicts.save_safetensors(model, directory / WEIGHTS)


def export_checkpoint(model: torch.nn.Module, directory: Path, max_shard_bytes: int | None) -> None:
    """Write ``model``'s config and weights with transformers' ``save_pretrained`` (shards with
    model.safetensors.index.json above ``max_shard_bytes``; None: transformers' default)."""
    model.save_pretrained(str(directory), **({} if max_shard_bytes is None else {"max_shard_size": max_shard_bytes}))
