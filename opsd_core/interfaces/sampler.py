"""The OnPolicySampler role: completions from the current student in its own context.

Owns: the sampling policy (temperature, caps, image-skip rule, stopping).
Does not know: losses or teachers; the model is driven only through the Backend interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from opsd_core.types import CompletionBatch, Context


class OnPolicySampler(ABC):
    """Samples one completion per context."""

    @abstractmethod
    def sample(
        self,
        model: torch.nn.Module,
        contexts: Sequence[Context],
        generator: torch.Generator | None = None,
        seeds: torch.Tensor | Sequence[int] | None = None,
    ) -> CompletionBatch:
        """One completion per context, sampled from ``model``; ``seeds`` (one per context) key
        each row's random draws, else they come from ``generator``."""
