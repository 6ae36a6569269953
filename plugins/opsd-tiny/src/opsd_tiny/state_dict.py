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

from opsd_core.api import CheckpointError, state_dicts
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
    state_dicts.save_safetensors(model.state_dict(), directory / WEIGHTS, dtype=torch.float32)
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
        tensors = state_dicts.read_safetensors([path])
    except CheckpointError as error:
        raise CheckpointError(f"{error}; {HOW_TO_MAKE}") from None
    report = state_dicts.compare_keys(model.state_dict(), tensors)
    if report.missing or report.unexpected:
        raise CheckpointError(
            f"{path}: does not match the tiny-umm architecture: missing tensors {report.missing[:5]}, "
            f"unexpected {report.unexpected[:5]}"
        )
    if report.wrong_shape:
        raise CheckpointError(
            f"{path}: tensor shapes differ from the model's: {'; '.join(report.wrong_shape[:5])}; the weights belong "
            f"to another architecture than the {CONFIG} the model was built from"
        )
    state_dicts.load_into(model, tensors, path)
