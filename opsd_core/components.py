"""Building the roles a run config names.

Owns: looking up each plugin section's name in its registry and calling the factory with the
validated section (which is an instance of the plugin's params model).
Does not know: what the components do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opsd_core.config import RunConfig
from opsd_core.interfaces import Backend, Divergence, Task, TeacherUpdate


@dataclass
class Components:
    """The roles of one run."""

    config: RunConfig
    backend: Backend
    task: Task
    divergence: Divergence
    teacher_update: TeacherUpdate


def build_components(config: RunConfig, registries: Any = None) -> Components:
    """Instantiate the backend, task, divergence and teacher update named by ``config``."""
    if registries is None:
        from opsd_core.plugins import get_registries

        registries = get_registries()

    def build(section: str) -> Any:
        params = getattr(config, section)
        return registries.of(section).create(params.name, params)

    return Components(config, build("backend"), build("task"), build("divergence"), build("teacher"))


def build_backend(config: RunConfig, registries: Any = None) -> Backend:
    """Only the backend named by ``config`` (benchmark evaluation needs no task or loss)."""
    if registries is None:
        from opsd_core.plugins import get_registries

        registries = get_registries()
    return registries.of("backend").create(config.backend.name, config.backend)
