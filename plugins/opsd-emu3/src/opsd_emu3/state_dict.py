"""Emu3 weights on disk, in the Hugging Face layout.

Owns: which files a checkpoint directory must hold (and the error naming them when they are
missing), reading ``model.safetensors`` or its shards, renaming the keys of checkpoints written
before transformers moved Emu3's modules under ``model.`` (``text_model.model.*``,
``text_model.lm_head.*``, ``vqmodel.*``), and writing a directory that loads alone (weights,
config with its vocabulary map, tokenizer, image-processor settings).
Does not know: training, sharding or optimizers; it is handed full (unsharded) modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers.utils import logging

from opsd_core.api import ConfigError, state_dicts

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PREPROCESSOR = "preprocessor_config.json"
# Checkpoints written for transformers < 4.52 kept the text model and the VQ-VAE at the top level.
LEGACY_KEYS = ((r"^text_model\.model\.", "model.text_model."), (r"^text_model\.lm_head\.", "lm_head."), (r"^vqmodel\.", "model.vqmodel."))


def check_directory(directory: Path, field: str = "backend.checkpoint") -> None:
    """Raise ConfigError, naming the config ``field``, unless ``directory`` holds a loadable Emu3 checkpoint."""
    required = ("config.json", "tokenizer_config.json", (WEIGHTS, INDEX), ("tokenizer.json", "vocab.json"))
    missing = state_dicts.missing_files(directory, required)
    if missing:
        raise ConfigError(
            f"{field}: {directory} is not an Emu3 checkpoint in the Hugging Face layout; it lacks "
            f"{', '.join(missing)}. Put the files of Emu3-Chat-hf or Emu3-Gen-hf there (nothing is downloaded)."
        )
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    if model_type != "emu3":
        raise ConfigError(
            f"{field}: {directory}/config.json has model_type {model_type!r}, want 'emu3' (the "
            "Hugging Face conversion, e.g. Emu3-Chat-hf; the original BAAI/Emu3-Chat repository uses remote code)"
        )


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in ``directory``, under the current transformers key names."""
    tensors = state_dicts.read_weights(Path(directory))
    return {legacy_to_current(name): tensor for name, tensor in tensors.items()}


def legacy_to_current(name: str) -> str:
    for pattern, replacement in LEGACY_KEYS:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def load_into(model: torch.nn.Module, directory: Path) -> None:
    """Copy the checkpoint's weights into ``model``: every key must match, shapes included (a
    tied ``lm_head`` may be absent). Raise :class:`~opsd_core.api.state_dicts.WeightsMismatchError`
    listing missing and unexpected keys and shape mismatches."""
    state_dicts.load_into(model, read_state_dict(directory), f"{directory} (this Emu3 config)")


def save_checkpoint(
    model: torch.nn.Module, tokenizer, image_settings: dict, directory: Path, max_shard_bytes: int | None = None
) -> None:
    """Write config.json, model.safetensors (shards with model.safetensors.index.json above
    ``max_shard_bytes``; None: transformers' default), the tokenizer files and
    preprocessor_config.json to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bar_was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # transformers draws a bar per shard written
    try:
        model.save_pretrained(directory, **({} if max_shard_bytes is None else {"max_shard_size": max_shard_bytes}))
    finally:
        if bar_was_on:
            logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)
    (directory / PREPROCESSOR).write_text(json.dumps({"image_processor_type": "Emu3ImageProcessor", **image_settings}, indent=2))


def read_image_settings(directory: Path) -> dict:
    """The image-processor settings of a checkpoint (empty when it has no preprocessor_config.json)."""
    path = Path(directory) / PREPROCESSOR
    return json.loads(path.read_text()) if path.is_file() else {}
