"""Atomic, verifiable training checkpoints.

Owns: the checkpoint directory layout (``step-NNNNNNN/`` with ``student/`` and ``teacher/``
written by the backend, ``trainer_state.pt`` and ``manifest.json``; the same layout whatever
the number of training processes, since rank 0 writes full weights), writing it through a
temporary directory and a rename so a crash never leaves a half-written checkpoint under its
final name, and verifying every file's size and SHA-256 before anything is loaded.
Also the one reader of a checkpoint's weights outside training (:func:`read_model_state`),
which export builds on: whatever the checkpoint's format, it returns a model's whole state dict.
Does not know: what the trainer state means; the backend writes and reads the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from opsd_core.errors import CheckpointError
from opsd_core.rundir import list_checkpoints, step_dir_name
from opsd_core.state_dicts import read_weights

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
MODELS = ("student", "teacher")
DCP_METADATA = ".metadata"
_FORMAT = 1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    write_weights: Callable[[Path], None],
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and return its directory.

    Args:
        checkpoints_dir: parent of the ``step-NNNNNNN`` directories.
        step: number of optimizer steps taken.
        write_weights: writes the model files (e.g. ``student/``, ``teacher/``) into the
            directory it is given.
        trainer_state: tensors and plain Python values only (loaded back with
            ``weights_only=True``).
        keep: if set, delete all but the newest ``keep`` complete checkpoints afterwards.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / step_dir_name(step)
    temporary = checkpoints_dir / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        write_weights(temporary)
        torch.save(trainer_state, temporary / TRAINER_STATE)
        files = {
            str(path.relative_to(temporary)): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(temporary.rglob("*"))
            if path.is_file()
        }
        manifest = {"format": _FORMAT, "step": step, "files": files}
        (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_tree(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(checkpoints_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def remove_interrupted_saves(checkpoints_dir: Path) -> list[Path]:
    """Delete the temporary directories of saves that a killed process left behind (the caller
    holds the run directory's lock, so no save is in progress); returns what was removed."""
    if not checkpoints_dir.is_dir():
        return []
    leftovers = [path for path in checkpoints_dir.iterdir() if path.name.startswith(".tmp-step-")]
    for path in leftovers:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    return leftovers


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """The manifest of ``directory`` after checking every file; CheckpointError otherwise."""
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {str(directory)!r} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {str(directory)!r} has no {MANIFEST}: it is partial (interrupted while "
            "being written) or not a checkpoint"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(
            isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)
            for entry in files.values()
        ):
            raise TypeError("'files' must map each name to its bytes and sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {str(directory)!r}: unreadable {MANIFEST} ({error})") from None
    if TRAINER_STATE not in files:
        raise CheckpointError(f"checkpoint {str(directory)!r}: {MANIFEST} does not list {TRAINER_STATE}")
    root = directory.resolve()
    for name in files:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            raise CheckpointError(f"checkpoint {str(directory)!r}: {MANIFEST} names {name!r}, outside the checkpoint")
    on_disk = set()
    for path in directory.rglob("*"):
        if path.is_symlink():
            raise CheckpointError(
                f"checkpoint {str(directory)!r}: {path.relative_to(directory)} is a symbolic link; "
                "checkpoints hold plain files only"
            )
        if path.is_file() and str(path.relative_to(directory)) != MANIFEST:
            on_disk.add(str(path.relative_to(directory)))
    unlisted = sorted(on_disk - set(files))
    if unlisted:
        raise CheckpointError(f"checkpoint {str(directory)!r} holds files its {MANIFEST} does not list: {unlisted[:5]}")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(directory)!r} is missing {name}")
        if root not in path.resolve().parents:
            raise CheckpointError(f"checkpoint {str(directory)!r}: {name} lies outside the checkpoint")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {str(directory)!r}: {name} is corrupt (checksum mismatch)")
    return manifest


def load_trainer_state(directory: Path, verify: bool = True, mmap: bool = False) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors and plain values, no pickled code).

    ``verify`` checks every file of the checkpoint first; ranks other than 0 of a multi-process
    run skip it (rank 0 verifies). ``mmap`` maps tensors from the file instead of reading them,
    so ranks that ignore the full optimizer state never read it.
    """
    if verify:
        verify_checkpoint(directory)
    return torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True, mmap=mmap)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None. A newest one that fails verification is an
    error, never skipped silently."""
    checkpoints = list_checkpoints(checkpoints_dir)
    if not checkpoints:
        return None
    verify_checkpoint(checkpoints[-1])
    return checkpoints[-1]


def read_model_state(directory: Path, model: str) -> dict[str, torch.Tensor]:
    """The whole state dict of checkpoint ``directory``'s ``model`` (``student`` or ``teacher``),
    on the CPU, under the model's own parameter names; the caller verifies the checkpoint first.

    Two formats are read: the directory a backend's ``save_pretrained`` wrote (``<model>/``
    holding ``model.safetensors``, or its shards and index: every backend writes its model's
    state dict there, tied duplicates dropped), and a ``torch.distributed.checkpoint`` directory
    (``<model>/.metadata`` and its ``.distcp`` files, written by several processes), whose
    sharded tensors are read whole. Its ``.metadata`` is a pickle, which is why the checkpoint
    must pass :func:`verify_checkpoint` (our own manifest vouches for every file) first.
    """
    if model not in MODELS:
        raise CheckpointError(f"a checkpoint holds the models {', '.join(MODELS)}; got {model!r}")
    weights = Path(directory) / model
    if (weights / DCP_METADATA).is_file():
        return _read_distributed(weights)
    return read_weights(weights, ("model",))


def _read_distributed(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``torch.distributed.checkpoint`` directory, whole, in this one process."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # As torch's own dcp_to_torch_save reads one: the planner fills the empty dict with every
    # tensor the metadata lists (the public ``load`` only fills keys it is given).
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(directory)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    tensors = {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{directory}: the distributed checkpoint holds no tensors at its top level")
    return tensors
