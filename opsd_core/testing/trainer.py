"""The trainer and its multi-process pieces, for backends' tests that drive training directly
rather than through ``opsd run`` (sharded start-up, resuming, decoding while gathered).

Owns: the list of names such tests use: the :class:`Trainer`, the :class:`Components` it
takes (built from a run config and checked by :func:`build_components`, or put together by hand
with three built-in roles: the JSD divergence, the EMA teacher, the batched sampler) and the
:class:`MetricsLog` it writes; this process among the training processes
(:class:`Ranks`, :func:`process_group`); the start model built on rank 0 and sharded
(:func:`build_start`), a rank's shards and new models cloned from them (:func:`local_tensors`,
:func:`sharded_clone`), a sharded model gathered back whole (:func:`unsharded_copy`,
:func:`gathered`), and what differs between a backend's meta skeleton and its model
(:func:`skeleton_mismatch`).
Does not know: any backend. These are the trainer's internals, re-exported here for tests
only: unlike :mod:`opsd_core.api`, they may change at any release.
"""

from opsd_core.components import Components, build_components
from opsd_core.divergences.jsd import JsdDivergence
from opsd_core.rundir import MetricsLog
from opsd_core.runtime import Ranks, process_group
from opsd_core.sampling import BatchedSampler
from opsd_core.teachers.ema import EmaTeacher
from opsd_core.trainer.sharding import (
    build_start,
    gathered,
    local_tensors,
    sharded_clone,
    unsharded_copy,
)
from opsd_core.trainer.sharding import _skeleton_mismatch as skeleton_mismatch
from opsd_core.trainer.trainer import Trainer

__all__ = [
    "Trainer",
    "Components",
    "build_components",
    "BatchedSampler",
    "MetricsLog",
    "JsdDivergence",
    "EmaTeacher",
    "Ranks",
    "process_group",
    "build_start",
    "local_tensors",
    "sharded_clone",
    "unsharded_copy",
    "gathered",
    "skeleton_mismatch",
]
