"""Model weights on disk as safetensors: finding, reading, checking, copying in and writing them.

Owns: which files hold a directory's weights (``<stem>.safetensors``, or the shards that
``<stem>.safetensors.index.json`` lists), reading them without pickle, comparing a state dict
with a model's (missing, unexpected and wrongly shaped keys, reported together in one
error), copying a checked state dict into a model, parameters tied to an earlier one, and
writing a model's tensors as one safetensors file or as shards with an index.
Does not know: any model family's key names, configs or tokenizers. Each backend's
``state_dict.py`` renames keys, drops what its model recomputes and writes its own config and
tokenizer files around these functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opsd_core.errors import CheckpointError

SHOWN = 6
"""Keys of each kind an error lists before it says how many more there are."""


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """A directory holds no weights file, or its index lists shards that are missing."""


class WeightsMismatchError(CheckpointError, ValueError):
    """A state dict does not fit a model: keys missing or unexpected, or shapes differing."""


def weight_files(directory: Path, stems: Sequence[str] = ("model",)) -> list[Path]:
    """The safetensors files holding the weights of ``directory``.

    Args:
        directory: the checkpoint directory.
        stems: file stems to try in order (e.g. ``("model", "ema")``); the first one present
            wins, as one file ``<stem>.safetensors`` or the shards listed (under
            ``weight_map``) in ``<stem>.safetensors.index.json``.

    Raises:
        WeightsNotFoundError: the directory does not exist, holds none of the files, or its
            index lists a shard that is not there; the message names what was expected and
            what the directory holds.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise WeightsNotFoundError(f"checkpoint directory {directory} does not exist")
    for stem in stems:
        single = directory / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = directory / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise WeightsNotFoundError(
                    f"{index} is not a safetensors index ({type(error).__name__}: {error}); it needs a "
                    "'weight_map' object from tensor names to shard file names"
                ) from None
            missing = [shard for shard in shards if not (directory / shard).is_file()]
            if missing:
                raise WeightsNotFoundError(f"{index} lists shards that are missing: {', '.join(missing[:SHOWN])}")
            return [directory / shard for shard in shards]
    found = sorted(path.name for path in directory.iterdir())
    raise WeightsNotFoundError(
        f"no weights in {directory}: expected {' or '.join(f'{stem}.safetensors' for stem in stems)} (one file) "
        f"or {stems[0]}.safetensors.index.json with its shards; found {found[:12]}{' ...' if len(found) > 12 else ''}"
    )


def read_safetensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` by name, on the CPU (later files win on a repeated name)."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                    state[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    return state


def read_weights(directory: Path, stems: Sequence[str] = ("model",)) -> dict[str, torch.Tensor]:
    """The state dict stored in ``directory`` (see :func:`weight_files` for which files)."""
    return read_safetensors(weight_files(directory, stems))


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names in ``model.state_dict()`` whose tensor is an earlier entry's (e.g. a tied ``lm_head``)."""
    seen: set[int] = set()
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied


@dataclass(frozen=True)
class KeyReport:
    """How a state dict differs from a model's.

    Attributes:
        missing: keys the model has and the state dict lacks, sorted.
        unexpected: keys the state dict has and the model lacks, sorted.
        wrong_shape: ``"key: file (..), model (..)"`` for each shared key of another shape.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def describe(self, missing_hint: str = "") -> str:
        """One line: counts and the first keys of each kind, ``missing_hint`` after the missing ones."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys{missing_hint}: {_first(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys: {_first(self.unexpected)}")
        if self.wrong_shape:
            parts.append(f"{len(self.wrong_shape)} shape mismatches: {_first(self.wrong_shape, '; ')}")
        return " | ".join(parts)


def _first(items: Sequence[str], separator: str = ", ") -> str:
    more = len(items) - SHOWN
    return separator.join(items[:SHOWN]) + (f" (+{more} more)" if more > 0 else "")


def compare_keys(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], optional: Iterable[str] = ()
) -> KeyReport:
    """How ``found`` (read from disk) differs from ``expected`` (a model's state dict).

    Keys in ``optional`` (e.g. tied duplicates, recomputed tables) may be absent from ``found``.
    """
    optional = set(optional)
    shapes = [
        f"{key}: file {tuple(found[key].shape)}, model {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in found and tuple(found[key].shape) != tuple(tensor.shape)
    ]
    return KeyReport(
        missing=sorted(set(expected) - set(found) - optional),
        unexpected=sorted(set(found) - set(expected)),
        wrong_shape=shapes,
    )


def check_state_dict(
    expected: Mapping[str, torch.Tensor],
    found: Mapping[str, torch.Tensor],
    source: object,
    optional: Iterable[str] = (),
    missing_hint: str = "",
) -> None:
    """Raise :class:`WeightsMismatchError` listing every difference of ``found`` from ``expected``.

    The message reads ``weights in {source} do not fit the model: N missing keys: ... | N
    unexpected keys: ... | N shape mismatches: key: file (..), model (..)``.
    """
    report = compare_keys(expected, found, optional)
    if report:
        raise WeightsMismatchError(f"weights in {source} do not fit the model: {report.describe(missing_hint)}")


def load_into(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: object,
    optional: Iterable[str] = (),
    missing_hint: str = "",
) -> None:
    """Check ``state`` against ``model`` (see :func:`check_state_dict`), then copy it in place.

    Every parameter and persistent buffer is copied (converted to the model's device and
    dtype); an ``optional`` key absent from ``state`` keeps the model's value. Tied parameters
    need only one of their names in ``state``.
    """
    expected = model.state_dict()
    check_state_dict(expected, state, source, {*optional, *tied_names(model)}, missing_hint)
    with torch.no_grad():
        for name, target in expected.items():
            if name in state:
                target.copy_(state[name])


def save_safetensors(
    tensors: Mapping[str, torch.Tensor] | torch.nn.Module, path: Path, dtype: torch.dtype | None = None
) -> None:
    """Write ``tensors`` (or a module's state dict, tied duplicates dropped) to one safetensors file.

    Tensors are detached, moved to the CPU, made contiguous and cast to ``dtype`` when given.
    """
    from safetensors.torch import save_file

    if isinstance(tensors, torch.nn.Module):
        tied = tied_names(tensors)
        tensors = {name: tensor for name, tensor in tensors.state_dict().items() if name not in tied}
    state = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})


def save_sharded_safetensors(
    tensors: Mapping[str, torch.Tensor] | torch.nn.Module,
    directory: Path,
    stem: str = "model",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
) -> list[Path]:
    """Write ``tensors`` (a module's: tied duplicates dropped) as ``<stem>.safetensors``, or, when
    they hold more than ``max_shard_bytes``, as shards ``<stem>-00001-of-0000N.safetensors`` listed
    in ``<stem>.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``, the layout
    :func:`weight_files` reads); returns the files written.

    Tensors go to shards in their order, a new shard starting where the next tensor would pass
    ``max_shard_bytes`` (a tensor larger than that alone fills one); sizes are counted in
    ``dtype`` when given. One shard at a time is cast and written.
    """
    if isinstance(tensors, torch.nn.Module):
        tied = tied_names(tensors)
        tensors = {name: tensor for name, tensor in tensors.state_dict().items() if name not in tied}
    directory = Path(directory)

    def size(tensor: torch.Tensor) -> int:
        return tensor.numel() * (dtype or tensor.dtype).itemsize

    total = sum(size(tensor) for tensor in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_safetensors(tensors, directory / f"{stem}.safetensors", dtype)
        return [directory / f"{stem}.safetensors"]
    shards: list[list[str]] = [[]]
    filled = 0
    for name, tensor in tensors.items():
        if shards[-1] and filled + size(tensor) > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size(tensor)
    written, weight_map = [], {}
    for number, names in enumerate(shards, start=1):
        path = directory / f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors({name: tensors[name] for name in names}, path, dtype)
        weight_map.update(dict.fromkeys(names, path.name))
        written.append(path)
    index = directory / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*written, index]


def missing_files(directory: Path, required: Iterable[str | Sequence[str]]) -> list[str]:
    """The entries of ``required`` absent from ``directory``; an entry that is a sequence of
    names is satisfied by any one of them and reported as ``"a (or b)"``."""
    directory = Path(directory)
    absent = []
    for entry in required:
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        if not any((directory / name).is_file() for name in names):
            absent.append(names[0] + (f" (or {', '.join(names[1:])})" if len(names) > 1 else ""))
    return absent
