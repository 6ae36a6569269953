"""Write the intersphinx inventories the documentation build reads offline.

What it is: ``conf.py`` maps Python, PyTorch, pydantic and pluggy to their upstream
documentation, but builds here and in CI have no network, so each mapping points at a local
``objects.inv`` in this directory instead of downloading the upstream one. This script writes
those files (Sphinx inventory format version 2, zlib-compressed) listing only the objects our
pages and docstrings refer to, each with its real upstream page and anchor, so the rendered
links lead to the upstream documentation. When a page starts referring to another external
object, add it to ``OBJECTS`` and run ``python docs/_inventories/build.py``; an object missing
here is shown as plain text, not a link (the build does not fail).
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

# project -> (name and version written in the header, {(object, domain:role): page#anchor}).
# A trailing "$" in a page stands for the object's name, as in upstream inventories.
OBJECTS: dict[str, tuple[str, str, dict[tuple[str, str], str]]] = {
    "python": ("Python", "3", {
        ("pathlib.Path", "py:class"): "library/pathlib.html#$",
        ("collections.abc.Sequence", "py:class"): "library/collections.abc.html#$",
        ("collections.abc.Mapping", "py:class"): "library/collections.abc.html#$",
        ("collections.abc.Iterable", "py:class"): "library/collections.abc.html#$",
        ("collections.abc.Iterator", "py:class"): "library/collections.abc.html#$",
        ("int", "py:class"): "library/functions.html#$",
        ("float", "py:class"): "library/functions.html#$",
        ("bool", "py:class"): "library/functions.html#$",
        ("str", "py:class"): "library/stdtypes.html#$",
        ("list", "py:class"): "library/stdtypes.html#$",
        ("dict", "py:class"): "library/stdtypes.html#$",
        ("tuple", "py:class"): "library/stdtypes.html#$",
        ("ValueError", "py:exception"): "library/exceptions.html#$",
        ("KeyError", "py:exception"): "library/exceptions.html#$",
        ("Exception", "py:exception"): "library/exceptions.html#$",
    }),
    "torch": ("PyTorch", "2", {
        ("torch.Tensor", "py:class"): "tensors.html#$",
        ("torch.nn.Module", "py:class"): "generated/torch.nn.Module.html#$",
        ("torch.nn.modules.module.Module", "py:class"): "generated/torch.nn.Module.html#torch.nn.Module",
        ("torch.Generator", "py:class"): "generated/torch.Generator.html#$",
        ("torch.device", "py:class"): "tensor_attributes.html#$",
        ("torch.dtype", "py:class"): "tensor_attributes.html#$",
    }),
    "pydantic": ("pydantic", "2", {
        ("pydantic.BaseModel", "py:class"): "api/base_model/#$",
        ("pydantic.main.BaseModel", "py:class"): "api/base_model/#pydantic.BaseModel",
        ("pydantic.fields.Field", "py:function"): "api/fields/#$",
        ("pydantic.Field", "py:function"): "api/fields/#pydantic.fields.Field",
        ("pydantic.config.ConfigDict", "py:class"): "api/config/#$",
        ("pydantic.ConfigDict", "py:class"): "api/config/#pydantic.config.ConfigDict",
    }),
    "pluggy": ("pluggy", "1", {
        ("pluggy.HookimplMarker", "py:class"): "api_reference.html#$",
        ("pluggy.HookspecMarker", "py:class"): "api_reference.html#$",
        ("pluggy.PluginManager", "py:class"): "api_reference.html#$",
        ("pluggy.HookimplOpts", "py:class"): "api_reference.html#$",
    }),
}


def inventory(project: str, version: str, objects: dict[tuple[str, str], str]) -> bytes:
    """The bytes of an ``objects.inv`` (format version 2) listing ``objects``."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    lines = "".join(f"{name} {role} 1 {page} -\n" for (name, role), page in sorted(objects.items()))
    return header.encode() + zlib.compress(lines.encode())


def main(directory: Path = HERE) -> None:
    """Write ``<project>.inv`` for each project of ``OBJECTS`` into ``directory``."""
    for key, (project, version, objects) in OBJECTS.items():
        (directory / f"{key}.inv").write_bytes(inventory(project, version, objects))


if __name__ == "__main__":
    main()
