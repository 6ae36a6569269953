"""Divergences between the student's and the teacher's next-token distributions.

Owns: the public functional API (``generalized_jsd``, ``kl_divergence``, and
``fused_topk_jsd`` from hidden states in :mod:`.fused`), the registered
classes (``JsdDivergence`` in :mod:`.jsd`; ``ForwardKlDivergence``, ``ReverseKlDivergence``
in :mod:`.kl`) and their torch-free params (:mod:`.params`).
Does not know: images, backends or contexts; a divergence sees logits and a mask.

Names are resolved on first use so that importing :mod:`opsd_core.divergences.params`
alone (config validation) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "generalized_jsd": "functional",
    "kl_divergence": "functional",
    "fused_topk_jsd": "fused",
    "JsdDivergence": "jsd",
    "ForwardKlDivergence": "kl",
    "ReverseKlDivergence": "kl",
    "JsdParams": "params",
    "KlParams": "params",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
