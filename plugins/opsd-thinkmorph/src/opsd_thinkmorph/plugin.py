"""Hook implementations of the thinkmorph plugin: backend ``thinkmorph`` and task ``thinkmorph-data``.

Owns: the registry names, their params models and one-line descriptions.
Does not know: torch or model code; factories are ``"module:attr"`` strings resolved on first
use, so ``opsd list`` stays light.
"""

from opsd_core.api import hookimpl

from opsd_thinkmorph.config import ThinkMorphParams
from opsd_thinkmorph.task_params import ThinkMorphDataParams


@hookimpl
def register_backends(registry):
    registry.add(
        "thinkmorph",
        "opsd_thinkmorph.backend:ThinkMorphBackend",
        ThinkMorphParams,
        description="ThinkMorph-7B / BAGEL-7B-MoT from a local directory (flavour 'debug': tiny, CPU).",
    )


@hookimpl
def register_tasks(registry):
    registry.add(
        "thinkmorph-data",
        "opsd_thinkmorph.task:ThinkMorphDataTask",
        ThinkMorphDataParams,
        description="ThinkMorph training parquet files from a local directory, with their stored visual thoughts.",
    )
