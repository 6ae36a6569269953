"""Hook implementations of the example plugin (nothing heavy imported here)."""

from opsd_core.hookspecs import hookimpl

from opsd_example_plugin.config import TotalVariationParams


@hookimpl
def register_divergences(registry):
    registry.add(
        "total-variation",
        "opsd_example_plugin.divergence:TotalVariation",
        TotalVariationParams,
        description="Total-variation distance over the teacher's top-K (example plugin).",
    )
