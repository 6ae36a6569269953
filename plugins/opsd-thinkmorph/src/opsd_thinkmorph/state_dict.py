"""Checkpoint files: the released ThinkMorph/BAGEL layout in, self-contained checkpoints out.

Owns: which weight files a directory holds (single file, shards with an index, ``model`` or
``ema``), the keys that are dropped on load (the recomputed sin-cos tables), the checks that
turn a wrong directory into a clear error, and writing a checkpoint that loads alone.
Does not know: how the model runs, the VAE's internals, training state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointFileError(f"checkpoint directory {directory} does not exist")
    stems = WEIGHT_STEMS if stem == "auto" else (stem,)
    if stem not in ("auto", *WEIGHT_STEMS):
        raise ValueError(f"weights file must be one of auto, model, ema; got {stem!r}")
    for name in stems:
        single = directory / f"{name}.safetensors"
        if single.is_file():
            return [single]
        index = directory / f"{name}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [shard for shard in shards if not (directory / shard).is_file()]
            if missing:
                raise CheckpointFileError(f"{index} lists shards that are missing: {', '.join(missing[:5])}")
            return [directory / shard for shard in shards]
    raise CheckpointFileError(
        f"no weights in {directory}: expected {' or '.join(f'{s}.safetensors' for s in stems)} (one file) "
        f"or {stems[0]}.safetensors.index.json with its shards; found "
        f"{sorted(p.name for p in directory.iterdir())[:12]}"
    )


def read_state(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    return state


def load_into(model: torch.nn.Module, directory: Path, stem: str = "auto") -> None:
    """Load the weights of ``directory`` into ``model``, checking every key and shape.

    A model built with ``visual_gen=True`` needs the generation weights; a file without them
    (an understanding-only checkpoint) is refused with a message saying so.
    """
    state = read_state(weight_files(directory, stem))
    for key in RECOMPUTED_KEYS:
        state.pop(key, None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if not getattr(model.config, "visual_gen", True):
        unexpected = [key for key in unexpected if not key.startswith(GENERATION_PREFIXES)]
        state = {key: value for key, value in state.items() if key in expected}
    wrong_shape = [
        f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            hint = ""
            if all(key.startswith(GENERATION_PREFIXES) for key in missing):
                hint = " (only the generation modules are missing: build with generation disabled to load it)"
            problems.append(f"{len(missing)} missing keys{hint}: {', '.join(missing[:6])}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:6])}")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} shape mismatches: {'; '.join(wrong_shape[:4])}")
        raise CheckpointContentError(f"weights in {directory} do not fit the model: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


def save_checkpoint(
    model: torch.nn.Module,
    config: BagelConfig,
    directory: Path,
    source: Path | None = None,
    stem: str = "model",
) -> None:
    """Write a directory our loader (and the official one) reads alone.

    Weights as ``<stem>.safetensors`` (the model's dtype), the two config files, the tokenizer
    files and ``ae.safetensors`` copied (hard-linked where possible) from ``source``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(state, str(directory / f"{stem}.safetensors"), metadata={"format": "pt"})
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
