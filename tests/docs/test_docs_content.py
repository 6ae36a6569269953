"""What the documentation promises about the code: every hook with its exact signature, the
tutorials in the table of contents and built, cross references to other projects resolved
offline, the API reference showing exactly the declared public API, and the how-to's
benchmark-task code running against the real API."""

from __future__ import annotations

import html
import importlib.util
import importlib
import inspect
import json
import pkgutil
import re
import types
import zlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import opsd_core.api
import opsd_core.testing
from opsd_core import hookspecs

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
HOOKS = {
    name: list(inspect.signature(function).parameters)
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
    if getattr(function, "opsd_spec", None) is not None
}


def test_the_hookspecs_are_found():
    assert {"register_backends", "register_tasks", "register_commands"} <= set(HOOKS)


def test_the_plugins_page_lists_every_hook_with_its_signature():
    page = (DOCS / "plugins.md").read_text()
    listed = dict(re.findall(r"^\| `(register_\w+)\(([^)]*)\)` \|", page, flags=re.MULTILINE))
    for name, parameters in HOOKS.items():
        assert name in listed, f"docs/plugins.md does not list the hook {name}"
        documented = [part.strip() for part in listed[name].split(",") if part.strip()]
        assert documented == parameters, (
            f"docs/plugins.md shows {name}({', '.join(documented)}), the hookspec is {name}({', '.join(parameters)})"
        )
    unknown = set(listed) - set(HOOKS)
    assert not unknown, f"docs/plugins.md lists hooks that do not exist: {unknown}"


@pytest.mark.docs
def test_the_api_reference_shows_every_hook_with_its_signature(built):
    page = (built / "reference" / "api.html").read_text()
    for name, parameters in HOOKS.items():
        anchor = f'id="opsd_core.hookspecs.{name}"'
        assert anchor in page, f"the API reference has no entry for the hook {name}"
        signature = page[page.index(anchor) : page.index("</dt>", page.index(anchor))]
        params = re.findall(r'<em class="sig-param">(.*?)</em>', signature, flags=re.DOTALL)
        shown = [html.unescape(re.sub(r"<[^>]+>", "", param)).split(":")[0].strip() for param in params]
        assert shown == parameters, (
            f"the API reference shows {name}({', '.join(shown)}), the hookspec is {name}({', '.join(parameters)})"
        )


def test_the_api_reference_lists_exactly_the_public_api():
    page = (DOCS / "reference" / "api.md").read_text()
    directive = r"^\.\. (?:autoclass|autofunction|autoexception|py:class|py:data):: (opsd_core\.api(?:\.\w+)?)\.(\w+)$"
    shown = re.findall(directive, page, flags=re.MULTILINE)
    modules = ["opsd_core.api"] + [
        info.name for info in pkgutil.iter_modules(opsd_core.api.__path__, "opsd_core.api.") if not info.ispkg
    ]
    for name in modules:
        declared = set(importlib.import_module(name).__all__)
        listed = [attribute for module, attribute in shown if module == name]
        assert len(listed) == len(set(listed)), f"docs/reference/api.md shows a name of {name} twice"
        assert set(listed) == declared, (
            f"docs/reference/api.md and {name}.__all__ differ: not shown {sorted(declared - set(listed))}, "
            f"not declared {sorted(set(listed) - declared)}"
        )
    assert {module for module, _ in shown} == set(modules), "docs/reference/api.md shows a module that is not public"
    helpers = [info.name for info in pkgutil.iter_modules(opsd_core.testing.__path__, "opsd_core.testing.")]
    missing = [name for name in helpers if f".. automodule:: {name}\n" not in page]
    assert not missing, f"docs/reference/api.md does not show the test helpers {missing}"


@pytest.mark.docs
def test_every_tutorial_is_in_the_table_of_contents_and_built(built):
    index = (DOCS / "index.md").read_text()
    tutorials = sorted(path.stem for path in (DOCS / "tutorials").glob("*.md"))
    assert tutorials == ["first-run", "new-umm-plugin", "thinkmorph-run"]
    toctree = index[index.index(":caption: Tutorials") :].split("```")[0]
    for name in tutorials:
        assert f"tutorials/{name}\n" in toctree, f"tutorials/{name} is not in the Tutorials toctree"
        assert (built / "tutorials" / f"{name}.html").is_file()


@pytest.mark.docs
def test_the_plugin_tutorial_shows_the_example_plugin_code(built):
    page = html.unescape(re.sub(r"<[^>]+>", "", (built / "tutorials" / "new-umm-plugin.html").read_text()))
    for line in (
        'example-backend = "opsd_example_backend.plugin"',
        "def completion_logits(",
        "def decode_step(self, state: ByteDecodeState, tokens: torch.Tensor) -> torch.Tensor:",
        "class ByteUMMParams(PluginParams):",
        "check_backend_contract(ByteBackend(small_params()), problems(), tmp_path)",
    ):
        assert line in page, f"the tutorial no longer shows {line!r}"


@pytest.mark.docs
def test_cross_references_to_other_projects_resolve_offline(built):
    api = (built / "reference" / "api.html").read_text()
    tutorial = (built / "tutorials" / "new-umm-plugin.html").read_text()
    assert 'href="https://docs.pytorch.org/docs/stable/tensors.html#torch.Tensor"' in api
    for link in (
        "https://docs.pytorch.org/docs/stable/generated/torch.nn.Module.html#torch.nn.Module",
        "https://docs.python.org/3/library/pathlib.html#pathlib.Path",
        "https://docs.python.org/3/library/collections.abc.html#collections.abc.Sequence",
    ):
        assert f'href="{link}"' in api, link
    for link in (
        "https://docs.pydantic.dev/latest/api/base_model/#pydantic.BaseModel",
        "https://pluggy.readthedocs.io/en/stable/api_reference.html#pluggy.HookimplMarker",
    ):
        assert f'href="{link}"' in tutorial, link


def _entries(path: Path) -> list[str]:
    data = path.read_bytes()
    header_end = 0
    for _ in range(4):
        header_end = data.index(b"\n", header_end) + 1
    return sorted(zlib.decompress(data[header_end:]).decode().splitlines())


def test_the_shipped_inventories_are_what_the_script_writes(tmp_path):
    inventories = DOCS / "_inventories"
    spec = importlib.util.spec_from_file_location("inventories_build", inventories / "build.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(tmp_path)
    written = sorted(path.name for path in tmp_path.glob("*.inv"))
    shipped = sorted(path.name for path in inventories.glob("*.inv"))
    assert written == shipped == ["pluggy.inv", "pydantic.inv", "python.inv", "torch.inv"]
    for name in written:
        assert _entries(tmp_path / name) == _entries(inventories / name), f"{name} is stale: run docs/_inventories/build.py"


def _howto_code() -> str:
    page = (DOCS / "howto.md").read_text()
    section = page[page.index("## Add a benchmark task") :]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_benchmark_task_of_the_howto_runs_with_opsd_eval(tmp_path, monkeypatch):
    from PIL import Image

    from opsd_core import plugins
    from opsd_core.cli import cli

    module = types.ModuleType("howto_shapes")
    code = compile(_howto_code(), "howto.md", "exec")
    exec(code, module.__dict__)  # noqa: S102 - the page's own code
    items = [
        {
            "id": index,
            "image": f"{index}.png",
            "question": "Which shape is drawn?",
            "options": {"A": "circle", "B": "square"},
            "answer": "AB"[index % 2],
        }
        for index in range(3)
    ]
    for index in range(3):
        Image.new("RGB", (40, 40), (200, 30 * index, 0)).save(tmp_path / f"{index}.png")
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))

    task = module.ShapesBenchmark(module.ShapesParams(root=str(tmp_path)))
    assert len(task.eval_problems()) == 3 and len(task.eval_problems(2)) == 2
    assert task.score(task.eval_problems()[1], "The answer is B").correct
    assert not task.score(task.eval_problems()[0], "B").correct

    manager = plugins.build_plugin_manager()
    manager.register(module, name="howto-shapes")
    registries = plugins.fill_registries(manager)
    monkeypatch.setattr(plugins, "get_registries", lambda: registries)
    result = CliRunner().invoke(
        cli,
        [
            "eval", str(ROOT / "examples" / "quickstart.toml"), "--contexts", "student",
            "--set", "task.name=shapes", "--set", f"task.root='{tmp_path}'",
            "--set", "backend.free_text='skip'", "--set", "eval.max_completion_tokens=4",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary[0]["context"] == "student" and summary[0]["count"] == 3
