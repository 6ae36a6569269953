"""Checkpoint files: the released ThinkMorph/BAGEL layout in, self-contained checkpoints out.

Owns: which weight files a directory holds (single file, shards with an index, ``model`` or
``ema``), the keys that are dropped on load (the recomputed sin-cos tables), the checks that
turn a wrong directory into a clear error, and writing a checkpoint that loads alone: our own
(``model.safetensors``) or the released layout (``ema.safetensors``, bf16, shards with an
index), which differ only in the weights' stem, dtype and sharding.
Does not know: how the model runs, the VAE's internals, training state.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from opsd_core.api import state_dicts
from opsd_thinkmorph.architecture import BagelConfig, CheckpointContentError, CheckpointFileError

# Frozen sin-cos tables: recomputed at construction, never loaded (as every official loader does).
RECOMPUTED_KEYS = ("vit_pos_embed.pos_embed", "latent_pos_embed.pos_embed")
GENERATION_PREFIXES = ("time_embedder.", "vae2llm.", "llm2vae.", "latent_pos_embed.")
WEIGHT_STEMS = ("model", "ema")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def weight_files(directory: Path, stem: str = "auto") -> list[Path]:
    """The safetensors files holding the weights of ``directory``.

    ``stem`` is ``model``, ``ema`` or ``auto`` (``model`` when present, else ``ema``). One file
    ``<stem>.safetensors`` or shards listed in ``<stem>.safetensors.index.json``. Student and
    teacher are both built from the one file chosen here, so they always start equal.
    """
    if stem not in ("auto", *WEIGHT_STEMS):
        raise ValueError(f"weights file must be one of auto, model, ema; got {stem!r}")
    try:
        return state_dicts.weight_files(directory, WEIGHT_STEMS if stem == "auto" else (stem,))
    except state_dicts.WeightsNotFoundError as error:
        raise CheckpointFileError(str(error)) from None


def load_into(model: torch.nn.Module, directory: Path, stem: str = "auto") -> None:
    """Load the weights of ``directory`` into ``model``, checking every key and shape.

    A model built with ``visual_gen=True`` needs the generation weights; a file without them
    (an understanding-only checkpoint) is refused with a message saying so.
    """
    state = state_dicts.read_safetensors(weight_files(directory, stem))
    for key in RECOMPUTED_KEYS:
        state.pop(key, None)
    expected = model.state_dict()
    if not getattr(model.config, "visual_gen", True):
        state = {key: value for key, value in state.items() if key in expected or not key.startswith(GENERATION_PREFIXES)}
    report = state_dicts.compare_keys(expected, state)
    if report:
        hint = ""
        if report.missing and all(key.startswith(GENERATION_PREFIXES) for key in report.missing):
            hint = " (only the generation modules are missing: build with generation disabled to load it)"
        raise CheckpointContentError(f"weights in {directory} do not fit the model: {report.describe(hint)}")
    model.load_state_dict(state, strict=True)


def save_checkpoint(
    model: torch.nn.Module,
    config: BagelConfig,
    directory: Path,
    source: Path | None = None,
    stem: str = "model",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Write a directory our loader (and the official one) reads alone.

    Weights as ``<stem>.safetensors`` in ``dtype`` (None: the model's), or as shards with
    ``<stem>.safetensors.index.json`` when larger than ``max_shard_bytes``; the two config files;
    the tokenizer files and ``ae.safetensors`` copied (hard-linked where possible) from
    ``source``. The released layout is ``stem="ema"`` in bf16; its tensor names and shapes are
    the model's state dict (the sin-cos tables, recomputed by every loader, are left out).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dicts.save_sharded_safetensors(model.state_dict(), directory, stem, dtype, max_shard_bytes)
    config.write(directory)
    if source is not None:
        for name in (*TOKENIZER_FILES, "ae.safetensors"):
            path = Path(source) / name
            if path.is_file() and not (directory / name).exists():
                _link_or_copy(path, directory / name)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copy2(source, target)
