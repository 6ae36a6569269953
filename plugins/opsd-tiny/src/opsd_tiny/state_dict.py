"""The tiny UMM's checkpoint directory: ``model.safetensors`` + ``config.json`` + ``vocab.json``.

Owns: the on-disk layout (fp32 weights by parameter name; the architecture under
``config.json``'s ``"architecture"`` key, with any provenance beside it; the token list), and
the errors that name the expected files when a directory is missing, partial or of another
shape. Nothing is unpickled.
Does not know: backends, training or contexts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from opsd_core.errors import CheckpointError
from opsd_tiny.model import TinyConfig
from opsd_tiny.vocab import Vocab

WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"
FILES = (WEIGHTS, CONFIG, VOCAB)
HOW_TO_MAKE = "make one with `python -m opsd_tiny.pretrain --out DIR` or the backend's save_pretrained"


def write_checkpoint(
    model: torch.nn.Module, config: TinyConfig, vocab: Vocab, directory: Path, metadata: dict[str, Any] | None = None
) -> None:
    """Write ``model``'s weights (fp32), ``config`` plus ``metadata`` and ``vocab`` to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in model.state_dict().items()
    }
    save_file(tensors, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps({"architecture": config.to_dict(), **(metadata or {})}, indent=2) + "\n")
    (directory / VOCAB).write_text(json.dumps(vocab.tokens) + "\n")


def _missing_files_error(directory: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{str(directory)!r} is not a tiny-umm checkpoint: missing {', '.join(names)} "
        f"(a checkpoint directory holds {', '.join(FILES)}; {HOW_TO_MAKE})"
    )


def read_metadata(directory: Path) -> tuple[TinyConfig, Vocab, dict[str, Any]]:
    """The architecture, vocabulary and the rest of ``config.json`` of a checkpoint directory."""
    directory = Path(directory)
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise _missing_files_error(directory, missing)
    try:
        config_json = json.loads((directory / CONFIG).read_text())
        architecture = config_json.pop("architecture")
        config = TinyConfig(**architecture)
        vocab = Vocab(json.loads((directory / VOCAB).read_text()))
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(
            f"{directory}: {CONFIG} or {VOCAB} is malformed ({type(error).__name__}: {error}); {CONFIG} needs an "
            f"'architecture' object with the fields of TinyConfig and {VOCAB} a list of unique tokens"
        ) from None
    if config.vocab_size != len(vocab):
        raise CheckpointError(
            f"{directory}: {CONFIG} says vocab_size {config.vocab_size}, {VOCAB} has {len(vocab)} tokens"
        )
    return config, vocab, config_json


def load_state(model: torch.nn.Module, directory: Path) -> None:
    """Copy the weights of ``directory`` into ``model`` in place (any device and dtype)."""
    directory = Path(directory)
    path = directory / WEIGHTS
    if not path.is_file():
        raise _missing_files_error(directory, [WEIGHTS])
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}); {HOW_TO_MAKE}") from None
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the tiny-umm architecture: missing tensors {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = [
        f"{name} {tuple(tensors[name].shape)} (model: {tuple(target.shape)})"
        for name, target in expected.items()
        if tensors[name].shape != target.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path}: tensor shapes differ from the model's: {', '.join(wrong[:5])}; the weights belong to another "
            f"architecture than the {CONFIG} the model was built from"
        )
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])
