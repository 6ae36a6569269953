"""Hook implementations of the example backend plugin, found through its ``opsd`` entry point.

Owns: the name ``byte-umm``, its params model and its one-line description.
Does not know: torch or model code; the backend class is registered as a lazy
``"module:attr"`` string, so ``opsd list`` imports nothing heavy.
"""

from opsd_core.api import hookimpl
from opsd_example_backend.config import ByteUMMParams


@hookimpl
def register_backends(registry):
    registry.add(
        "byte-umm",
        "opsd_example_backend.backend:ByteBackend",
        ByteUMMParams,
        description="Small byte-level UMM reading image patches, seeded random weights (example backend plugin).",
    )
