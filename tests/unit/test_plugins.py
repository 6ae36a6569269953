"""Plugin manager: built-ins through the hooks, entry points, OPSD_LOAD_PLUGINS, errors."""

import types

import pluggy
import pytest

from opsd_core import hookspecs
from opsd_core.errors import DuplicateNameError
from opsd_core.hookspecs import hookimpl
from opsd_core.plugins import (
    BUILTIN_PLUGIN_NAME,
    allowed_plugins,
    build_plugin_manager,
    fill_registries,
    plugin_info,
)


def test_allowed_plugins_parsing():
    assert allowed_plugins({}) is None
    assert allowed_plugins({"OPSD_LOAD_PLUGINS": ""}) == set()
    assert allowed_plugins({"OPSD_LOAD_PLUGINS": " a, b ,,"}) == {"a", "b"}


def test_builtins_register_through_the_hooks():
    manager = build_plugin_manager({"OPSD_LOAD_PLUGINS": ""})
    assert [name for name, _ in manager.list_name_plugin()] == [BUILTIN_PLUGIN_NAME]
    registries = fill_registries(manager)
    assert {"jsd", "kl", "reverse-kl"} <= set(registries.divergence.names())
    assert registries.teacher.names() == ["ema", "frozen"]
    assert registries.divergence.get("jsd").plugin == BUILTIN_PLUGIN_NAME


def test_external_plugin_loads_from_its_entry_point():
    manager = build_plugin_manager({})
    registries = fill_registries(manager)
    entry = registries.divergence.get("total-variation")
    assert entry.plugin == "example"
    info = {item["name"]: item for item in plugin_info(manager)}
    assert info["example"]["distribution"] == "opsd-example-plugin"
    assert info["example"]["version"]
    assert "register_divergences" in info["example"]["hooks"]


def test_load_plugins_allows_by_entry_point_or_distribution_name():
    for allowed in ("example", "opsd-example-plugin"):
        manager = build_plugin_manager({"OPSD_LOAD_PLUGINS": allowed})
        names = {name for name, _ in manager.list_name_plugin()}
        assert names == {BUILTIN_PLUGIN_NAME, "example"}
    manager = build_plugin_manager({"OPSD_LOAD_PLUGINS": "something-else"})
    assert "example" not in {name for name, _ in manager.list_name_plugin()}


def _manager_with(*plugins):
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    for name, plugin in plugins:
        manager.register(plugin, name=name)
    return manager


def _divergence_plugin(name):
    @hookimpl
    def register_divergences(registry):
        registry.add(name, dict)

    return types.SimpleNamespace(register_divergences=register_divergences)


def test_duplicate_names_across_plugins_name_both():
    manager = _manager_with(("first", _divergence_plugin("same")), ("second", _divergence_plugin("same")))
    with pytest.raises(DuplicateNameError) as info:
        fill_registries(manager)
    assert "'first'" in str(info.value) and "'second'" in str(info.value)


def test_a_misspelled_hook_is_reported():
    plugin = types.SimpleNamespace(register_divergence=hookimpl(lambda registry: None))
    manager = _manager_with(("typo", plugin))
    with pytest.raises(pluggy.PluginValidationError, match="register_divergence"):
        manager.check_pending()
