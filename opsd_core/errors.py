"""Exception types shared by the whole framework.

Owns: the error classes users see, and the formatting that makes them one readable line.
Does not know: where errors come from (config, registries, checkpoints); each caller raises
the class that fits and puts the field, the bad value and the fix in the message.
"""

from __future__ import annotations

import difflib
import os
import tempfile
import traceback
from collections.abc import Iterable


class OpsdError(Exception):
    """Base class of every error the framework raises on purpose.

    The CLI prints ``str(error)`` as one clear line and exits non-zero; any other exception is a
    bug and keeps its traceback.
    """


class ConfigError(OpsdError, ValueError):
    """A configuration file or override is invalid."""


class PluginError(OpsdError):
    """A plugin could not be loaded or registered something invalid."""


class DuplicateNameError(PluginError):
    """Two plugins registered the same name in one registry."""


class UnknownNameError(OpsdError, KeyError):
    """A name was looked up in a registry that does not hold it.

    Subclasses ``KeyError`` so ``except KeyError`` keeps working, but prints its message as is
    (``KeyError`` would wrap it in quotes).
    """

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        super().__init__(self._message())

    def _message(self) -> str:
        known = ", ".join(self.known) if self.known else "(none registered)"
        message = f"unknown {self.kind} {self.name!r}; known {self.kind}s: {known}"
        close = closest_match(self.name, self.known)
        if close is not None:
            message += f". Did you mean {close!r}?"
        return message

    def __str__(self) -> str:
        return self._message()


class CheckpointError(OpsdError):
    """A checkpoint directory is missing, partial, corrupt or of the wrong layout."""


class NonFiniteError(OpsdError):
    """A training step produced a non-finite loss or gradient norm (``train.on_non_finite = "stop"``)."""


class CapabilityError(OpsdError):
    """A backend was asked for something it cannot do (e.g. image generation, a long context)."""


class GpuOutOfMemoryError(OpsdError):
    """A run needed more GPU memory than the device had; the message says where and what fits."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is CUDA running out of memory (``torch.cuda.OutOfMemoryError``, or a
    ``RuntimeError`` saying so), told apart without importing torch."""
    return type(error).__name__ == "OutOfMemoryError" or (
        isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)
    )


def log_traceback() -> str:
    """Write the exception being handled to a new file in the temporary directory; its path."""
    handle, path = tempfile.mkstemp(prefix="opsd-error-", suffix=".log")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        traceback.print_exc(file=stream)
    return path


def closest_match(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to ``name``, or None if none is reasonably close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None
