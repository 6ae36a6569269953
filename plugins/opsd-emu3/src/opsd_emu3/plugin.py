"""Hook implementations of the emu3 plugin: backend ``emu3``.

Owns: the registry name, its params model and one-line description.
Does not know: torch or model code; the factory is a ``"module:attr"`` string resolved on first
use, so ``opsd list`` stays light.
"""

from opsd_core.api import hookimpl

from opsd_emu3.config import Emu3Params


@hookimpl
def register_backends(registry):
    registry.add(
        "emu3",
        "opsd_emu3.backend:Emu3Backend",
        Emu3Params,
        description="Emu3 (transformers' Emu3ForConditionalGeneration) from a local directory (flavour 'debug': tiny, CPU).",
    )
