"""Typed name -> factory tables filled by plugins.

Owns: registration (with the registering plugin recorded), lazy ``"module:attr"`` factories,
optional pydantic parameter models, and the errors for duplicate and unknown names.
Does not know: what the factories build; the plugin manager decides which plugins register.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from opsd_core.errors import DuplicateNameError, PluginError, UnknownNameError

_NAME_PATTERN = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Entry:
    """One registered name.

    ``factory`` is a class/callable, or a ``"package.module:attr"`` string resolved on first use
    so that listing names never imports heavy modules.
    """

    name: str
    factory: Callable[..., Any] | str
    params: type[BaseModel] | None
    plugin: str
    description: str = ""

    def resolve(self) -> Callable[..., Any]:
        """The factory itself, importing it if it was registered as a string."""
        if not isinstance(self.factory, str):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
            target: Any = module
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as error:
            raise PluginError(
                f"{self.name!r} (from plugin {self.plugin!r}) points to {self.factory!r}, "
                f"which cannot be imported: {error}"
            ) from error
        return target


@dataclass
class Registry:
    """Name -> factory table for one kind of component (``backend``, ``task``, ...)."""

    kind: str
    _entries: dict[str, Entry] = field(default_factory=dict)
    _current_plugin: str = "<direct>"

    def add(
        self,
        name: str,
        factory: Callable[..., Any] | str,
        params: type[BaseModel] | None = None,
        *,
        description: str = "",
    ) -> None:
        """Register ``name``.

        Args:
            name: lowercase-hyphenated registry name, e.g. ``"reverse-kl"``.
            factory: a class/callable, or a lazy ``"module:attr"`` string.
            params: optional pydantic model validating this entry's config section.
            description: one line shown by ``opsd list``.

        Raises:
            DuplicateNameError: ``name`` is already registered (the message names both plugins).
            PluginError: the name, factory or params are malformed.
        """
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise PluginError(
                f"plugin {self._current_plugin!r} registered {self.kind} name {name!r}; names "
                "must be lowercase words joined by hyphens, e.g. 'reverse-kl'"
            )
        if isinstance(factory, str):
            if ":" not in factory:
                raise PluginError(
                    f"{self.kind} {name!r}: lazy factory {factory!r} must look like 'module:attr'"
                )
        elif not callable(factory):
            raise PluginError(f"{self.kind} {name!r}: factory must be callable or a 'module:attr' string")
        if params is not None and not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise PluginError(f"{self.kind} {name!r}: params must be a pydantic BaseModel subclass")
        if name in self._entries:
            previous = self._entries[name].plugin
            raise DuplicateNameError(
                f"{self.kind} {name!r} is registered twice: by plugin {previous!r} and by plugin "
                f"{self._current_plugin!r}; uninstall one, or limit plugins with OPSD_LOAD_PLUGINS"
            )
        self._entries[name] = Entry(name, factory, params, self._current_plugin, description)

    def get(self, name: str) -> Entry:
        """The entry for ``name``; raises :class:`UnknownNameError` listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, self._entries) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Resolve ``name``'s factory and call it."""
        return self.get(name).resolve()(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._entries)
