"""Atomic, verifiable training checkpoints.

Owns: the checkpoint directory layout (``step-NNNNNNN/`` with ``student/`` and ``teacher/``,
``trainer_state.pt`` and ``manifest.json``; the same layout whatever the number of training
processes, since rank 0 writes full weights), writing it through a temporary directory and a
rename so a crash never leaves a half-written checkpoint under its final name, and verifying
every file's size and SHA-256 before anything is loaded.

``student/`` and ``teacher/`` come in two forms. When the student trains every parameter they
are the backend's own self-contained directories (``Backend.save_pretrained``). When it has
frozen parameters (``Backend.frozen_parameters``) each holds ``trainable.safetensors`` only:
every tensor of the model's state dict except the frozen parameters. The frozen parameters are
then those of the start checkpoint, which ``start.json`` records: ``{"frozen": [names],
"path": the start checkpoint (None for weights drawn from a seed), "sha256": its hash (a
directory's: over its files' relative paths and hashes, sorted), "backend": the run's backend
section}``. A complete model is that start with ``trainable.safetensors`` loaded over it.
Does not know: what the trainer state means, or a model family's own file layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from opsd_core.errors import CheckpointError
from opsd_core.rundir import list_checkpoints, step_dir_name

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
TRAINABLE_WEIGHTS = "trainable.safetensors"
START_RECORD = "start.json"
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


# ------------------------------------------------------------------ checkpoints of a partly frozen model
def path_sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory: over each file's relative path and SHA-256, in
    sorted order (so the hash does not depend on how the directory was copied)."""
    path = Path(path)
    if path.is_file():
        return _sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{_sha256(file)}\n".encode())
    return digest.hexdigest()


def start_record(start: Path | None, frozen: Iterable[str], backend_section: dict[str, Any]) -> dict[str, Any]:
    """What ``start.json`` holds: where the frozen parameters come from."""
    return {
        "frozen": sorted(frozen),
        "path": None if start is None else str(Path(start).resolve()),
        "sha256": None if start is None else path_sha256(start),
        "backend": backend_section,
    }


def check_start(directory: Path, start: Path | None) -> dict[str, Any]:
    """``directory``'s start record, after checking that ``start`` (this run's start
    checkpoint) hashes as the one it was trained from; CheckpointError otherwise."""
    record = json.loads((directory / START_RECORD).read_text(encoding="utf-8"))
    expected = record.get("sha256")
    if expected is not None and (start is None or path_sha256(start) != expected):
        raise CheckpointError(
            f"checkpoint {str(directory)!r} keeps only trainable tensors; its frozen ones are those of the start "
            f"checkpoint {record.get('path')!r} (sha256 {expected}), but this run starts from "
            f"{None if start is None else str(start)!r}, which differs; start from that checkpoint to load it"
        )
    return record


def write_trainable(model: torch.nn.Module, frozen: set[str], directory: Path) -> None:
    """``directory/trainable.safetensors``: ``model``'s state dict without the ``frozen`` parameters."""
    from opsd_core.state_dicts import save_safetensors, tied_names

    skipped = frozen | tied_names(model)
    tensors = {name: tensor for name, tensor in model.state_dict().items() if name not in skipped}
    save_safetensors(tensors, Path(directory) / TRAINABLE_WEIGHTS)


def read_trainable(model: torch.nn.Module, frozen: set[str], directory: Path) -> None:
    """Load ``directory/trainable.safetensors`` into ``model``, whose ``frozen`` parameters keep
    their values; CheckpointError unless it holds exactly the other tensors."""
    from opsd_core.state_dicts import read_safetensors, tied_names

    tensors = read_safetensors([Path(directory) / TRAINABLE_WEIGHTS])
    expected = set(model.state_dict()) - frozen - tied_names(model)
    if set(tensors) != expected:
        wrong = sorted(set(tensors) ^ expected)
        raise CheckpointError(
            f"{directory}: {TRAINABLE_WEIGHTS} does not hold this model's trainable tensors (e.g. {wrong[:3]}); "
            "was it written with another trainable set?"
        )
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in tensors:
                tensor.copy_(tensors[name])


def load_model(backend: Any, model: torch.nn.Module, directory: Path, name: str = "student") -> None:
    """Fill ``model`` (as ``backend.build_model`` made it: the start weights) from a model
    directory, or from a training checkpoint's ``name`` (student or teacher): complete, or its
    trainable tensors over the start weights after checking the start's hash."""
    directory = Path(directory)
    if not (directory / name).is_dir():
        backend.load_weights(model, directory)
        return
    verify_checkpoint(directory)
    if (directory / START_RECORD).is_file():
        record = check_start(directory, backend.start_checkpoint())
        read_trainable(model, set(record["frozen"]), directory / name)
    else:
        backend.load_weights(model, directory / name)
