"""Sphinx configuration: MyST Markdown pages, the furo theme, and reference pages generated from
the code (the CLI by sphinx-click, config models by autodoc_pydantic, the API by autodoc)."""

from __future__ import annotations

project = "opsd"
author = "opsd contributors"
copyright = "2026, opsd contributors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx_click",
    "sphinxcontrib.autodoc_pydantic",
    "sphinx_copybutton",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_inventories"]
html_theme = "furo"
html_title = "opsd"

myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath", "amsmath"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_mock_imports = []
autodoc_pydantic_model_show_json = False
autodoc_pydantic_model_show_config_summary = False
autodoc_pydantic_model_show_validator_summary = False
autodoc_pydantic_model_show_field_summary = False
autodoc_pydantic_field_list_validators = False

# Links to other projects' documentation. Builds have no network, so each mapping reads a
# local inventory listing the objects our pages refer to (written by _inventories/build.py);
# the links still point at the upstream pages.
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", "_inventories/python.inv"),
    "torch": ("https://docs.pytorch.org/docs/stable", "_inventories/torch.inv"),
    "pydantic": ("https://docs.pydantic.dev/latest", "_inventories/pydantic.inv"),
    "pluggy": ("https://pluggy.readthedocs.io/en/stable", "_inventories/pluggy.inv"),
}
nitpicky = False
suppress_warnings = ["myst.xref_missing"]
