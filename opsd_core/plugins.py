"""The plugin manager: built-ins plus the ``opsd`` entry-point group.

Owns: which plugins load (``OPSD_LOAD_PLUGINS``), calling the register hooks one plugin at a
time so every registry entry records its plugin, and plugin metadata for ``opsd plugins``.
Does not know: what the plugins register.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any

import pluggy

from opsd_core import hookspecs
from opsd_core.errors import PluginError
from opsd_core.registry import Registry

ENTRY_POINT_GROUP = "opsd"
LOAD_PLUGINS_ENV = "OPSD_LOAD_PLUGINS"
BUILTIN_PLUGIN_NAME = "opsd-core"

_DISTRIBUTIONS: dict[str, tuple[str, str]] = {}

REGISTRY_HOOKS = {
    "backend": "register_backends",
    "task": "register_tasks",
    "divergence": "register_divergences",
    "teacher": "register_teacher_updates",
    "sampler": "register_samplers",
    "context": "register_contexts",
    "logger": "register_loggers",
}


@dataclass
class Registries:
    """Every registry, filled by the loaded plugins."""

    backend: Registry = field(default_factory=lambda: Registry("backend"))
    task: Registry = field(default_factory=lambda: Registry("task"))
    divergence: Registry = field(default_factory=lambda: Registry("divergence"))
    teacher: Registry = field(default_factory=lambda: Registry("teacher"))
    sampler: Registry = field(default_factory=lambda: Registry("sampler"))
    context: Registry = field(default_factory=lambda: Registry("context"))
    logger: Registry = field(default_factory=lambda: Registry("logger"))

    def of(self, kind: str) -> Registry:
        if kind not in REGISTRY_HOOKS:
            raise KeyError(kind)
        return getattr(self, kind)


def allowed_plugins(environ: dict[str, str] | None = None) -> set[str] | None:
    """Names allowed by ``OPSD_LOAD_PLUGINS``: None when unset (load all), empty set = none."""
    value = (os.environ if environ is None else environ).get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


def _entry_point_allowed(entry_point: importlib.metadata.EntryPoint, allowed: set[str] | None) -> bool:
    if allowed is None:
        return True
    names = {entry_point.name}
    if entry_point.dist is not None:
        names.add(entry_point.dist.name)
    return bool(names & allowed)


def build_plugin_manager(environ: dict[str, str] | None = None) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, the built-ins and the allowed external plugins."""
    from opsd_core import default_plugins

    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(default_plugins, name=BUILTIN_PLUGIN_NAME)
    allowed = allowed_plugins(environ)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if not _entry_point_allowed(entry_point, allowed) or manager.has_plugin(entry_point.name):
            continue
        try:
            plugin = entry_point.load()
        except Exception as error:
            raise PluginError(
                f"plugin {entry_point.name!r} ({entry_point.value}) failed to import: {error}. "
                f"Run with {LOAD_PLUGINS_ENV}='' to start without external plugins."
            ) from error
        manager.register(plugin, name=entry_point.name)
        if entry_point.dist is not None:
            _DISTRIBUTIONS[entry_point.name] = (entry_point.dist.name, entry_point.dist.version)
    manager.check_pending()
    return manager


def fill_registries(manager: pluggy.PluginManager) -> Registries:
    """Call every register hook, one plugin at a time, so entries record their plugin."""
    registries = Registries()
    for kind, hook_name in REGISTRY_HOOKS.items():
        registry = registries.of(kind)
        hook = getattr(manager.hook, hook_name)
        for impl in reversed(hook.get_hookimpls()):
            registry._current_plugin = impl.plugin_name  # noqa: SLF001
            impl.function(registry=registry)
        registry._current_plugin = "<direct>"  # noqa: SLF001
    return registries


@functools.cache
def _cached() -> tuple[pluggy.PluginManager, Registries]:
    manager = build_plugin_manager()
    return manager, fill_registries(manager)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager (built once)."""
    return _cached()[0]


def get_registries() -> Registries:
    """The process-wide registries (filled once)."""
    return _cached()[1]


def reset() -> None:
    """Forget the cached manager and registries (tests; after changing ``OPSD_LOAD_PLUGINS``)."""
    _cached.cache_clear()


def plugin_info(manager: pluggy.PluginManager | None = None) -> list[dict[str, Any]]:
    """Name, version and implemented hooks of every loaded plugin, for ``opsd plugins``."""
    manager = manager or get_plugin_manager()
    info = []
    for name, plugin in manager.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
        if name == BUILTIN_PLUGIN_NAME:
            distribution, version = "opsd-core", importlib.metadata.version("opsd-core")
        else:
            distribution, version = _DISTRIBUTIONS.get(name, (None, None))
        info.append({"name": name, "distribution": distribution, "version": version, "hooks": hooks})
    return sorted(info, key=lambda item: (item["name"] != BUILTIN_PLUGIN_NAME, item["name"]))
