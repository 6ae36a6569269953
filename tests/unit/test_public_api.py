"""The declared plugin API holds: plugins and examples import from the core only what
:mod:`opsd_core.api`, its submodules and :mod:`opsd_core.testing` declare, every declared name
exists, and the API's root stays torch-free for the light commands.

Imports are read with ``ast`` from every file of the plugins' and examples' packages and
tests, imports inside functions and under ``TYPE_CHECKING`` included.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import opsd_core.api
import opsd_core.testing

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_CODE = ("plugins/*/src", "plugins/*/tests", "examples/*/src", "examples/*/tests")


def _submodules(package) -> list[str]:
    return [info.name for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}.") if not info.ispkg]


PUBLIC_API = ["opsd_core.api", *_submodules(opsd_core.api)]
TEST_HELPERS = ["opsd_core.testing", *_submodules(opsd_core.testing)]
PUBLIC = PUBLIC_API + TEST_HELPERS


def _plugin_files() -> list[Path]:
    files = sorted(path for pattern in PLUGIN_CODE for folder in ROOT.glob(pattern) for path in folder.rglob("*.py"))
    assert len(files) > 50, f"found only {len(files)} files under {PLUGIN_CODE}"
    return files


def _core_imports(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """``(line, module, name)`` of each import of opsd_core in ``path``; ``name`` is None for
    ``import opsd_core.x``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "opsd_core":
                    yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "opsd_core":
            for alias in node.names:
                yield node.lineno, node.module, alias.name


def _declared(module_name: str, name: str) -> bool:
    """Whether ``from module_name import name`` stays within the public API: a public
    submodule, a name in the module's ``__all__``, or (test helpers without ``__all__``) one of
    its public attributes."""
    if f"{module_name}.{name}" in PUBLIC:
        return True
    module = importlib.import_module(module_name)
    declared = getattr(module, "__all__", None)
    if declared is not None:
        return name in declared
    return module_name in TEST_HELPERS and not name.startswith("_") and hasattr(module, name)


def test_plugins_and_examples_import_only_the_public_api():
    outside = []
    for path in _plugin_files():
        where = path.relative_to(ROOT)
        for line, module, name in _core_imports(path):
            if name is None:
                if module not in PUBLIC:
                    outside.append(f"{where}:{line}: import {module}")
            elif module == "opsd_core" and name in ("api", "testing"):
                continue
            elif module not in PUBLIC:
                outside.append(f"{where}:{line}: from {module} import {name} ({module} is not public)")
            elif not _declared(module, name):
                outside.append(f"{where}:{line}: from {module} import {name} ({name} is not declared there)")
    assert not outside, (
        "imports from the core outside its public API (opsd_core.api and its submodules, opsd_core.testing); "
        "use the public name or declare it in opsd_core.api:\n" + "\n".join(outside)
    )


def test_plugin_and_config_modules_use_only_the_torch_free_root():
    """The light commands import every plugin's ``plugin.py`` and the ``config.py`` it names."""
    heavy = []
    for path in _plugin_files():
        if path.name in ("plugin.py", "config.py") and "src" in path.parts:
            heavy += [
                f"{path.relative_to(ROOT)}:{line}: {module}"
                for line, module, _ in _core_imports(path)
                if module != "opsd_core.api"
            ]
    assert not heavy, "plugin.py and config.py may import only opsd_core.api (its submodules import torch):\n" + "\n".join(heavy)


@pytest.mark.parametrize("module_name", PUBLIC)
def test_every_declared_name_resolves(module_name):
    module = importlib.import_module(module_name)
    declared = getattr(module, "__all__", [])
    if module_name in PUBLIC_API:
        assert declared, f"{module_name} declares no __all__"
    assert len(declared) == len(set(declared)), f"{module_name}.__all__ repeats a name"
    missing = [name for name in declared if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ declares names it does not have: {missing}"


def test_the_root_declares_the_roles_and_the_registration():
    assert {"Backend", "Task", "Divergence", "TeacherUpdate", "PrivilegedContextBuilder", "OnPolicySampler"} <= set(
        opsd_core.api.__all__
    )
    assert {"hookimpl", "Registry", "PluginParams", "ConfigError"} <= set(opsd_core.api.__all__)


def test_importing_the_api_root_and_the_cli_helpers_imports_no_torch():
    code = "import sys, opsd_core.api, opsd_core.testing.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", f"importing opsd_core.api imported {result.stdout.strip()}"
