"""Hook implementations of the janus plugin: backend ``janus-pro``.

Owns: the registry name, its params model and one-line description.
Does not know: torch or model code; the factory is a ``"module:attr"`` string resolved on
first use, so ``opsd list`` stays light.
"""

from opsd_core.api import hookimpl
from opsd_janus.config import JanusParams


@hookimpl
def register_backends(registry):
    registry.add(
        "janus-pro",
        "opsd_janus.backend:JanusBackend",
        JanusParams,
        description="Janus-Pro (1B/7B, transformers' Janus) from a local directory (flavour 'debug': tiny, CPU).",
    )
