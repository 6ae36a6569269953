"""The import graph: one-way imports in the core and in every plugin.

Reads the source with ``ast`` (imports inside functions and under ``TYPE_CHECKING`` count, as
they do for anyone reading the code) and checks: no cycle among the modules of ``opsd_core``
or of any plugin package; the core never imports a plugin; ``opsd_core.config`` and the
modules behind the light commands never reach torch or model code, even lazily.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_PACKAGES = sorted(
    path for pattern in ("plugins/*/src/*", "examples/*/src/*") for path in ROOT.glob(pattern) if (path / "__init__.py").is_file()
)
HEAVY = ("torch", "transformers", "diffusers", "safetensors", "numpy", "PIL", "matplotlib", "pyarrow")
# What `opsd --help`, `opsd list`, `opsd validate`, `opsd config` and `opsd plugins` import, and
# the process of `opsd sweep` that waits beside its runs.
LIGHT_MODULES = ("opsd_core.cli.builtin", "opsd_core.config", "opsd_core.plugins", "opsd_core.sweep")


def package_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package in ``package_dir``."""
    found = {}
    for path in package_dir.rglob("*.py"):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name ``module`` imports (absolute; relative imports resolved), anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest module of ``modules`` that ``name`` is or lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports."""
    modules = package_modules(package_dir)
    edges = {}
    for module, path in modules.items():
        targets = {owner(name, modules) for name in imported_names(module, path)}
        edges[module] = {target for target in targets if target and target != module}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle_through_three_modules():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_absolute_names(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("def f():\n    from ..top import g\n")
    (package / "top.py").write_text("from .sub.leaf import f\n")
    assert graph.__wrapped__(package) == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.leaf"},
        "pkg.sub.leaf": {"pkg.top"},
        "pkg.top": {"pkg.sub.leaf"},
    }


@pytest.mark.parametrize("package_dir", [ROOT / "opsd_core", *PLUGIN_PACKAGES], ids=lambda p: p.name)
def test_no_import_cycles(package_dir):
    found = cycles(graph(package_dir))
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_core_never_imports_a_plugin():
    plugins = {path.name for path in PLUGIN_PACKAGES}
    modules = package_modules(ROOT / "opsd_core")
    offenders = [
        f"{module} imports {name}"
        for module, path in modules.items()
        for name in imported_names(module, path)
        if name.split(".")[0] in plugins
    ]
    assert not offenders, offenders


def reachable(start: str, package_dir: Path) -> dict[str, str]:
    """Every core module ``start`` may import, even lazily, each with the module that imports
    it first (parents of a module count: importing ``a.b`` runs ``a``; the packages ``start``
    itself lies in do not: for ``opsd_core.cli.builtin`` that is the CLI group, whose other
    commands import torch when they run, which the subprocess tests in test_cli.py check)."""
    modules = package_modules(package_dir)
    edges = graph(package_dir)
    seen = {start: ""} | {".".join(start.split(".")[:i]): "" for i in range(1, start.count(".") + 1)}
    todo = [start]
    while todo:
        module = todo.pop()
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        for target in [*edges[module], *(p for p in parents if p in modules)]:
            if target not in seen:
                seen[target] = module
                todo.append(target)
    return seen


@pytest.mark.parametrize("light", LIGHT_MODULES)
def test_light_modules_never_reach_torch(light):
    modules = package_modules(ROOT / "opsd_core")
    offenders = []
    for module, via in reachable(light, ROOT / "opsd_core").items():
        heavy = sorted(n for n in imported_names(module, modules[module]) if n.split(".")[0] in HEAVY)
        if heavy:
            chain = [module]
            while via:
                chain.append(via)
                via = reachable(light, ROOT / "opsd_core")[via]
            offenders.append(f"{' <- '.join(chain)} imports {', '.join(heavy)}")
    assert not offenders, f"{light} reaches heavy packages:\n" + "\n".join(offenders)
