"""Atomic, verifiable training checkpoints.

Owns: the checkpoint directory layout, ``step-NNNNNNN/`` holding ``trainer_state.pt``,
``manifest.json`` and the weights in one of three forms:

* ``student/`` and ``teacher/`` as the backend saves a whole model (``Backend.save_pretrained``;
  single-process runs whose student trains every parameter);
* ``student/trainable.safetensors`` and ``teacher/trainable.safetensors`` (single-process runs
  whose student has frozen parameters, ``Backend.frozen_parameters``): every tensor of the
  model's state dict except the frozen parameters, which are those of the start checkpoint that
  ``start.json`` records: ``{"frozen": [names], "path": the start checkpoint (None for weights
  drawn from a seed), "sha256": its hash (a directory's: over its files' relative paths and
  hashes, sorted), "backend": the run's backend section}``; a complete model is that start with
  ``trainable.safetensors`` loaded over it;
* ``student/adapters.safetensors`` and ``teacher/adapters.safetensors`` (LoRA runs): the
  adapter tensors, with ``start.json`` naming the start model they go over, as above;
* ``sharded/``, a ``torch.distributed.checkpoint`` directory where every process of a
  multi-process run writes its own shards of the complete student, teacher and optimizer state
  (:func:`is_sharded`).

Writing goes through a temporary directory and a rename, so a crash never leaves a
half-written checkpoint under its final name; every file's size and SHA-256 is recorded
(hashed by all the processes, each its share of the files) and verified before anything is
loaded. Also the readers of a checkpoint's weights outside training (:func:`load_model` into a
built model, :func:`read_model_state` as a state dict), the full weights of a sharded
checkpoint read in one process (:func:`read_sharded_weights`), what a sharded checkpoint holds
(:func:`sharded_entries`), and the library's pickled metadata read allowing only its own
classes (:class:`SafeShardedReader`).
Does not know: what the trainer state means, how models are sharded or a model family's own
file layout; the trainer and the backend fill the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from opsd_core.errors import CheckpointError
from opsd_core.rundir import list_checkpoints, step_dir_name
from opsd_core.runtime import Ranks
from opsd_core.state_dicts import read_weights

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
SHARDED = "sharded"
MODELS = ("student", "teacher")
TRAINABLE_WEIGHTS = "trainable.safetensors"
START_RECORD = "start.json"
_FORMAT = 1
# What the metadata of a sharded checkpoint may name: the library's descriptions of tensors and
# of where their bytes lie, sizes, layouts and paths (dtypes are checked apart).
_METADATA_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}  # fmt: skip


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recorded(path: Path) -> dict[str, Any]:
    """The manifest entry of ``path``, once its bytes are on disk (fsync)."""
    with path.open("rb") as handle:
        os.fsync(handle.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    write_weights: Callable[[Path], None],
    trainer_state: dict[str, Any] | None,
    keep: int | None = None,
    ranks: Ranks | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and return its directory.

    Args:
        checkpoints_dir: parent of the ``step-NNNNNNN`` directories.
        step: number of optimizer steps taken.
        write_weights: writes the model files (``student/`` and ``teacher/``, or ``sharded/``)
            into the directory it is given; every rank calls it.
        trainer_state: tensors and plain Python values only (loaded back with
            ``weights_only=True``); rank 0's is written, other ranks may pass None.
        keep: if set, delete all but the newest ``keep`` complete checkpoints afterwards.
        ranks: the training processes (default: a single process). Every rank must call this;
            they write into rank 0's temporary directory, which must be on a file system all of
            them see, and each hashes a share of its files.
    """
    ranks = ranks or Ranks()
    final = checkpoints_dir / step_dir_name(step)
    temporary = None
    if ranks.is_main:
        checkpoints_dir.mkdir(parents=True, exist_ok=True)
        temporary = checkpoints_dir / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
    temporary = ranks.broadcast(temporary)
    try:
        write_weights(temporary)
        if ranks.is_main:
            torch.save(trainer_state, temporary / TRAINER_STATE)
        ranks.barrier()
        names = ranks.broadcast(
            sorted(str(path.relative_to(temporary)) for path in temporary.rglob("*") if path.is_file())
            if ranks.is_main
            else None
        )
        shares = ranks.gather({name: _recorded(temporary / name) for name in names[ranks.rank :: ranks.world_size]})
        if ranks.is_main:
            files = {name: entry for share in shares for name, entry in share.items()}
            manifest = {"format": _FORMAT, "step": step, "processes": ranks.world_size, "files": dict(sorted(files.items()))}
            (temporary / MANIFEST).write_text(json.dumps(manifest, indent=1))
            _recorded(temporary / MANIFEST)
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
        ranks.barrier()
    except BaseException:
        if ranks.is_main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if keep is not None and ranks.is_main:
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


def is_sharded(directory: Path) -> bool:
    """Whether the checkpoint ``directory`` holds its weights in ``sharded/`` (written by a
    multi-process run) rather than as whole models in ``student/`` and ``teacher/``."""
    return (directory / SHARDED).is_dir()


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a sharded checkpoint's ``.metadata`` allowing only :data:`_METADATA_GLOBALS`
    and dtypes, so reading it runs no code the file names."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeShardedReader(FileSystemReader):
    """The reader of a checkpoint's ``sharded/`` directory: the library's own, except that its
    metadata is unpickled with :class:`_MetadataUnpickler`. Callers load tensors only (the
    library unpickles other values without restriction)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with (Path(self.path) / ".metadata").open("rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"the metadata is a {type(metadata).__name__}, not the library's Metadata")
        metadata.storage_meta = metadata.storage_meta or StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def sharded_entries(directory: Path) -> dict[str, tuple[int, ...] | None]:
    """What the ``sharded/`` part of checkpoint ``directory`` holds: each flattened key
    (``student.<parameter>``, ``teacher.<parameter>``, ``optimizer.state.<parameter>.<name>``,
    ...) with its full tensor shape, or None for a value that is not a tensor."""
    return {
        key: tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else None
        for key, entry in _sharded_metadata(directory).state_dict_metadata.items()
    }


def _sharded_metadata(directory: Path) -> Metadata:
    try:
        return SafeShardedReader(str(directory / SHARDED)).read_metadata()
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"checkpoint {str(directory)!r}: unreadable {SHARDED}/ ({error})") from None


@contextlib.contextmanager
def sharded_read_in_one_process() -> Iterator[None]:
    """Read a sharded checkpoint without a process group, without the library's warning that
    this is what happens (reading it whole in one process is intended here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def read_sharded_weights(directory: Path, role: str) -> dict[str, torch.Tensor]:
    """The full weights of ``role`` (``student`` or ``teacher``) in the sharded checkpoint
    ``directory``, keyed as the model's ``state_dict()`` names them; read in this one process
    (no process group), whatever the number of processes that wrote it. Verifies the checkpoint
    first."""
    from torch.distributed.checkpoint import load as load_sharded

    verify_checkpoint(directory)
    if not is_sharded(directory):
        raise CheckpointError(f"checkpoint {str(directory)!r} holds no {SHARDED}/ directory")
    prefix = f"{role}."
    state = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in _sharded_metadata(directory).state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"checkpoint {str(directory)!r}: {SHARDED}/ holds no {role} weights")
    with sharded_read_in_one_process():
        load_sharded(state, storage_reader=SafeShardedReader(str(directory / SHARDED)), no_dist=True)
    return {key.removeprefix(prefix): tensor for key, tensor in state.items()}


def read_model_state(directory: Path, model: str) -> dict[str, torch.Tensor]:
    """The whole state dict of checkpoint ``directory``'s ``model`` (``student`` or ``teacher``),
    on the CPU, under the model's own parameter names, in either form: the directory a
    backend's ``save_pretrained`` wrote (``<model>/``, tied duplicates dropped) or the shards of
    a multi-process run (``sharded/``, read whole). The caller verifies the checkpoint first
    (:func:`read_sharded_weights` verifies it again)."""
    if model not in MODELS:
        raise CheckpointError(f"a checkpoint holds the models {', '.join(MODELS)}; got {model!r}")
    directory = Path(directory)
    if is_sharded(directory):
        return read_sharded_weights(directory, model)
    if (directory / START_RECORD).is_file():
        raise CheckpointError(
            f"checkpoint {str(directory)!r} holds trainable tensors only; load it over its start model (load_model)"
        )
    return read_weights(directory / model, ("model",))


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


def load_model(
    backend: Any, model: torch.nn.Module, directory: Path, name: str = "student", adapters: Any | None = None
) -> None:
    """Fill ``model`` (as ``backend.build_model`` made it: the start weights) from a model
    directory, or from a training checkpoint's ``name`` (student or teacher): complete (whole or
    sharded), its trainable tensors over the start weights, or (``adapters``, the run's
    ``[backend.lora]`` section) its LoRA adapters merged into the start weights; the last two
    after checking the start's hash where the checkpoint records it."""
    from opsd_core import lora

    directory = Path(directory)
    if adapters is not None and (directory / name / lora.ADAPTERS_FILE).is_file():
        verify_checkpoint(directory)
        if (directory / START_RECORD).is_file():
            check_start(directory, backend.start_checkpoint())
        lora.load_merged(model, adapters, directory / name)
        return
    if is_sharded(directory):
        model.load_state_dict(read_sharded_weights(directory, name))
        return
    if not (directory / name).is_dir():
        backend.load_weights(model, directory)
        return
    verify_checkpoint(directory)
    if (directory / START_RECORD).is_file():
        record = check_start(directory, backend.start_checkpoint())
        if (directory / name / lora.ADAPTERS_FILE).is_file():
            raise CheckpointError(
                f"checkpoint {str(directory)!r} holds LoRA adapters; load it with the run's config, whose "
                "[backend.lora] section says where they go (--config RUN_DIR/config.toml)"
            )
        read_trainable(model, set(record["frozen"]), directory / name)
    else:
        backend.load_weights(model, directory / name)
