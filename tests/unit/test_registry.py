"""Registry: registration, lazy factories, duplicate and unknown names."""

import pytest
from pydantic import BaseModel

from opsd_core.errors import DuplicateNameError, PluginError, UnknownNameError
from opsd_core.registry import Registry


class _Params(BaseModel):
    size: int = 1


def _registry(plugin="plugin-a"):
    registry = Registry("divergence")
    registry._current_plugin = plugin
    return registry


def test_add_and_create_with_callable():
    registry = _registry()
    registry.add("double", lambda x: 2 * x, _Params, description="twice")
    assert registry.create("double", 21) == 42
    entry = registry.get("double")
    assert entry.plugin == "plugin-a" and entry.params is _Params and entry.description == "twice"


def test_lazy_string_factory_is_resolved_on_use():
    registry = _registry()
    registry.add("joiner", "os.path:join")
    assert registry.create("joiner", "a", "b").endswith("b")


def test_lazy_factory_that_cannot_import_names_entry_and_plugin():
    registry = _registry()
    registry.add("broken", "no_such_module_xyz:thing")
    with pytest.raises(PluginError, match=r"'broken'.*plugin-a.*no_such_module_xyz"):
        registry.create("broken")


def test_duplicate_names_both_plugins():
    registry = _registry("first-plugin")
    registry.add("jsd", dict)
    registry._current_plugin = "second-plugin"
    with pytest.raises(DuplicateNameError) as info:
        registry.add("jsd", list)
    assert "first-plugin" in str(info.value) and "second-plugin" in str(info.value)
    assert registry.get("jsd").factory is dict


def test_unknown_name_lists_known_and_suggests_closest():
    registry = _registry()
    for name in ("jsd", "kl", "reverse-kl"):
        registry.add(name, dict)
    with pytest.raises(KeyError) as info:
        registry.get("revers-kl")
    error = info.value
    assert isinstance(error, UnknownNameError)
    message = str(error)
    assert "jsd, kl, reverse-kl" in message and "Did you mean 'reverse-kl'" in message
    assert not message.startswith('"')


def test_unknown_name_without_close_match_has_no_suggestion():
    registry = _registry()
    registry.add("jsd", dict)
    assert "Did you mean" not in str(pytest.raises(UnknownNameError, registry.get, "zzzzzz").value)


@pytest.mark.parametrize("name", ["Upper", "under_score", "", "trailing-", "-lead", "two  words"])
def test_malformed_names_are_rejected(name):
    with pytest.raises(PluginError, match="lowercase"):
        _registry().add(name, dict)


def test_malformed_factory_and_params_are_rejected():
    registry = _registry()
    with pytest.raises(PluginError, match="module:attr"):
        registry.add("lazy", "no-colon-here")
    with pytest.raises(PluginError, match="callable"):
        registry.add("value", 3)
    with pytest.raises(PluginError, match="pydantic"):
        registry.add("params", dict, params=dict)


def test_iteration_is_sorted_and_len_counts():
    registry = _registry()
    for name in ("b", "a", "c"):
        registry.add(name, dict)
    assert [entry.name for entry in registry] == ["a", "b", "c"] == registry.names()
    assert len(registry) == 3 and "a" in registry and "z" not in registry
