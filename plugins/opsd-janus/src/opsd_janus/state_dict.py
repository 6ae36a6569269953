"""Janus checkpoints on disk, in the Hugging Face layout.

Owns: which files make a checkpoint directory (``config.json``, ``model.safetensors`` or
shards listed in ``model.safetensors.index.json``, the tokenizer files,
``preprocessor_config.json``), reading them into a model with a clear error for anything
missing or mismatched, and writing a model so that the same code (or transformers'
``from_pretrained``) loads it alone. Parameter names are transformers' own
(``model.language_model.layers.0...``, ``lm_head.weight``): no renaming.
Does not know: contexts, sampling or training.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
EXPECTED_FILES = (
    "config.json, model.safetensors (or shards with model.safetensors.index.json), tokenizer.json, "
    "tokenizer_config.json and preprocessor_config.json"
)


def require_checkpoint(directory: Path) -> None:
    """Raise FileNotFoundError naming what belongs in ``directory`` when it is not a checkpoint."""
    missing = [name for name in ("config.json", "tokenizer_config.json") if not (directory / name).is_file()]
    if not (directory / WEIGHTS).is_file() and not (directory / INDEX).is_file():
        missing.append(WEIGHTS)
    if missing:
        raise FileNotFoundError(
            f"{directory} is not a Janus-Pro checkpoint in the Hugging Face layout: missing {', '.join(missing)}. "
            f"It must hold {EXPECTED_FILES} (e.g. a local copy of deepseek-community/Janus-Pro-1B)."
        )


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of ``directory``: the single file, or the index's shards."""
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    if (directory / INDEX).is_file():
        index = json.loads((directory / INDEX).read_text())
        return [directory / name for name in sorted(set(index["weight_map"].values()))]
    raise FileNotFoundError(f"{directory} holds no {WEIGHTS} or {INDEX}; a checkpoint holds {EXPECTED_FILES}")


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (e.g. a tied ``lm_head``)."""
    seen: set[int] = set()
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied


def load_into(model: torch.nn.Module, directory: Path) -> None:
    """Copy the weights of ``directory`` into ``model`` (every parameter and persistent buffer,
    tied duplicates excepted); raise naming missing or unexpected keys and shape mismatches."""
    directory = Path(directory)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        state.update(load_file(str(path)))
    expected = model.state_dict()
    tied = tied_names(model)
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory}: the weights do not fit this Janus config: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    with torch.no_grad():
        for name, target in expected.items():
            if name in tied and name not in state:
                continue
            source = state[name]
            if source.shape != target.shape:
                raise ValueError(f"{directory}: {name} has shape {tuple(source.shape)}, the model {tuple(target.shape)}")
            target.copy_(source)


def save_checkpoint(model: torch.nn.Module, directory: Path) -> None:
    """Write ``model``'s config and weights (one safetensors file, tied duplicates dropped)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(directory))
    tied = tied_names(model)
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
        if name not in tied
    }
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
