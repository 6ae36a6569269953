"""Hook implementations of the tiny plugin (imports no torch)."""

from opsd_core.hookspecs import hookimpl

from opsd_tiny.config import FrozenLakeParams, TinyBackendParams


@hookimpl
def register_backends(registry):
    registry.add(
        "tiny-umm",
        "opsd_tiny.backend:TinyBackend",
        TinyBackendParams,
        description="~0.86M-parameter patch-token UMM with a shipped frozen-lake checkpoint (CPU).",
    )


@hookimpl
def register_tasks(registry):
    registry.add(
        "frozen-lake",
        "opsd_tiny.task:FrozenLakeTask",
        FrozenLakeParams,
        description="Procedural 5x5 frozen-lake navigation; the visual thought is the drawn path.",
    )
