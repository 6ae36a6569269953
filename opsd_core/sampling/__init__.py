"""Batched on-policy sampling, written only against the Backend interface.

Owns: the public names of the built-in sampler (:mod:`.sampler`) and its torch-free params
(:mod:`.params`). Names are resolved on first use so that importing
:mod:`opsd_core.sampling.params` alone (config validation) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "BatchedSampler": "sampler",
    "batched_sampler": "sampler",
    "choose_tokens": "sampler",
    "row_seeds": "sampler",
    "sample_seed": "sampler",
    "seeded_choice": "sampler",
    "top_k_draw": "sampler",
    "uniform_noise": "sampler",
    "BatchedSamplerParams": "params",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
