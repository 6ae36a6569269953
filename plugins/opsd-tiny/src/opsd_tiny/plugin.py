"""Hook implementations of the tiny plugin: backend ``tiny-umm`` and task ``frozen-lake``.

Owns: the registry names, their params models and one-line descriptions.
Does not know: torch or model code; factories are ``"module:attr"`` strings resolved on first
use, so ``opsd list`` stays light.
"""

from opsd_core.api import hookimpl

from opsd_tiny.config import FrozenLakeParams, TinyBackendParams


@hookimpl
def register_backends(registry):
    registry.add(
        "tiny-umm",
        "opsd_tiny.backend:TinyBackend",
        TinyBackendParams,
        description="855k-parameter patch-token UMM with a shipped frozen-lake checkpoint (runs on a CPU).",
    )


@hookimpl
def register_tasks(registry):
    registry.add(
        "frozen-lake",
        "opsd_tiny.task:FrozenLakeTask",
        FrozenLakeParams,
        description="Procedural 5x5 frozen-lake navigation; the visual thought is the shortest path drawn.",
    )
