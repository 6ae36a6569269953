"""The public helpers a backend's model code uses; they need torch.

Owns: the list of torch-side names a backend may import, grouped below: padding token rows
and reading completion rows back out, FSDP2 building blocks for ``parallelize`` and the
launcher's world size, and the framework's batched sampler (for backends that answer in
several rounds). They keep their meaning and signatures within a minor version, like
:mod:`opsd_core.api`; weights on disk are in :mod:`opsd_core.api.state_dicts`.
Does not know: any model family. Import it from a backend's model-side modules only
(``backend.py``, ``parallelize.py``), never from ``plugin.py`` or ``config.py``: importing
it imports torch.
"""

from opsd_core.batching import (
    PaddedRows,
    completion_columns,
    completion_rows,
    gather_rows,
    pad_left,
    pad_right,
)
from opsd_core.parallel import (
    checkpoint_forward,
    mixed_precision_policy,
    whole_parameter,
)
from opsd_core.runtime import launched_world_size
from opsd_core.sampling import BatchedSampler, choose_tokens, top_k_draw

__all__ = [
    # Batching: B token rows padded into one (B, T) block, completion rows gathered back.
    "PaddedRows",
    "pad_left",
    "pad_right",
    "gather_rows",
    "completion_rows",
    "completion_columns",
    # FSDP2 building blocks for a backend's ``parallelize``.
    "mixed_precision_policy",
    "checkpoint_forward",
    "whole_parameter",
    "launched_world_size",
    # Sampling: the framework's batched on-policy sampler and its token choice.
    "BatchedSampler",
    "choose_tokens",
    "top_k_draw",
]
