"""Hook implementations of the example plugin, found through its ``opsd`` entry point.

Owns: the name ``total-variation`` and its params model.
Does not know: torch; the divergence class is registered as a lazy ``"module:attr"`` string
so that ``opsd list`` imports nothing heavy.
"""

from opsd_core.api import hookimpl
from opsd_example_plugin.config import TotalVariationParams


@hookimpl
def register_divergences(registry):
    registry.add(
        "total-variation",
        "opsd_example_plugin.divergence:TotalVariation",
        TotalVariationParams,
        description="Total-variation distance over the teacher's top-K support (example plugin).",
    )
