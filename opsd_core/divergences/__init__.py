"""Divergences between student and teacher distributions.

``generalized_jsd`` and ``kl_divergence`` are the public functional API; the registered
classes live in :mod:`opsd_core.divergences.classes`. Attributes are imported on first use so
that the torch-free :mod:`opsd_core.divergences.params` can be imported alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["generalized_jsd", "kl_divergence"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from opsd_core.divergences import functional

        return getattr(functional, name)
    raise AttributeError(f"module 'opsd_core.divergences' has no attribute {name!r}")
