"""The declared lower bounds of the dependencies, installed and tested.

Owns: reading every distribution's direct dependencies (core, plugins, examples) from its
``pyproject.toml``, turning each ``>=`` floor into a ``==`` pin, and the ``floors`` tier: one
fresh virtualenv that gets the distributions of one group at a time, editable from this
checkout, with every direct dependency of that group pinned at its floor, then runs that
group's fast tests with that virtualenv's interpreter. The pins are read from the same files
pip reads, so the floors and this test cannot drift apart; where two distributions of a group
declare different floors for one dependency, the higher one is the floor that can be installed.
A later group pins only its own dependencies: pip may lift what an earlier group installed
(the core's safetensors, say) where the later group's dependencies need more.

The groups, in order, each adding to the same virtualenv:

- opsd-core (with its ``test`` extra), opsd-tiny, opsd-benchmarks and the example plugin: the
  unit tests, the command-line tests and the short effect run. opsd-tiny is then the
  only backend installed, so the config model's plugin sections are unions of one member:
  the oldest supported pydantic is tested with a single backend (the development install
  tests the newest with all of them).
- opsd-thinkmorph (transformers and diffusers at their floors) and the example backend.
- opsd-janus and opsd-emu3, which need a newer transformers than thinkmorph's floor (pip lifts
  it, and what it needs, over what the earlier groups installed).

Torch is the one dependency not pinned at its floor: PyPI's Linux x86-64 torch wheels are
CUDA builds (above 500 MB, with some GB of CUDA libraries), so the tier installs the torch the
running interpreter has (the CPU build of the development install). The torch floor is the
release the ``gpu`` tier runs on.

Does not know: what the tests it launches check, or how the distributions are built.
"""

from __future__ import annotations

import os
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECTS = [ROOT, *sorted((ROOT / "plugins").glob("opsd-*")), *sorted((ROOT / "examples").glob("opsd-*"))]
CORE_EXTRAS = ("test",)  # the extras installed with the core (the docs build is the docs tier's)

# (distributions installed, editable, with their dependencies at their floors; the tests run), in order.
GROUPS = {
    "tiny": (
        [ROOT, ROOT / "plugins" / "opsd-tiny", ROOT / "plugins" / "opsd-benchmarks", ROOT / "examples" / "opsd-example-plugin"],
        [
            "tests/unit", "tests/integration/test_embedded_effects_short.py", "tests/integration/test_cli.py",
            "tests/integration/test_run_command.py", "plugins/opsd-tiny", "plugins/opsd-benchmarks",
            "examples/opsd-example-plugin",
        ],  # fmt: skip
    ),
    "thinkmorph": (
        [ROOT / "plugins" / "opsd-thinkmorph", ROOT / "examples" / "opsd-example-backend"],
        ["plugins/opsd-thinkmorph", "examples/opsd-example-backend"],
    ),
    "janus-emu3": (
        [ROOT / "plugins" / "opsd-janus", ROOT / "plugins" / "opsd-emu3"],
        ["plugins/opsd-janus", "plugins/opsd-emu3"],
    ),
}


def direct_requirements(project: Path) -> list[Requirement]:
    """The distribution's runtime dependencies (and, for the core, those of ``CORE_EXTRAS``),
    the other opsd distributions left out."""
    declared = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    texts = list(declared.get("dependencies", []))
    if project == ROOT:
        for extra in CORE_EXTRAS:
            texts += declared["optional-dependencies"][extra]
    requirements = [Requirement(text) for text in texts]
    return [requirement for requirement in requirements if not requirement.name.startswith("opsd-")]


def floor_of(requirement: Requirement) -> Version | None:
    """The version a ``>=`` specifier names; None when the requirement has no floor."""
    floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    return max(floors, default=None)


def floor_pins(projects: list[Path]) -> list[str]:
    """``name==floor`` for every direct dependency of ``projects`` but torch, the highest floor
    where several declare one."""
    floors: dict[str, Version] = {}
    for project in projects:
        for requirement in direct_requirements(project):
            floor = floor_of(requirement)
            name = requirement.name.lower().replace("_", "-")
            if floor is not None and name != "torch":
                floors[name] = max(floor, floors.get(name, floor))
    return [f"{name}=={floor}" for name, floor in sorted(floors.items())]


def test_every_dependency_declares_a_floor():
    """A dependency without a lower bound would let pip pick any release, tested or not."""
    unbounded = [
        f"{project.name}: {requirement}"
        for project in PROJECTS
        for requirement in direct_requirements(project)
        if floor_of(requirement) is None
    ]
    assert not unbounded, "dependencies without a '>=' floor:\n" + "\n".join(unbounded)


@pytest.fixture(scope="module")
def floors_env(tmp_path_factory):
    """(the virtualenv's python, a subprocess environment that sees nothing of the development
    install)."""
    directory = tmp_path_factory.mktemp("floors") / "env"
    venv.EnvBuilder(with_pip=True).create(directory)
    clean = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "OPSD_LOAD_PLUGINS")}
    clean["CI"] = "1"
    return directory / "bin" / "python", clean


def _install(floors_env, projects: list[Path]) -> None:
    python, environment = floors_env
    targets = [f"{ROOT}[{','.join(CORE_EXTRAS)}]" if project == ROOT else str(project) for project in projects]
    editable = [argument for target in targets for argument in ("-e", target)]
    pins = floor_pins(projects)
    command = [str(python), "-m", "pip", "install", "-q", f"torch=={torch.__version__}", *pins, *editable]
    subprocess.run(command, cwd=ROOT, env=environment, check=True)


def _run_tests(floors_env, paths: list[str]) -> None:
    python, environment = floors_env
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths]
    ran = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stdout[-6000:] + ran.stderr[-2000:]


@pytest.mark.floors
def test_core_and_tiny_at_their_floors_with_tiny_the_only_backend(floors_env):
    projects, paths = GROUPS["tiny"]
    _install(floors_env, projects)
    python, environment = floors_env
    listed = subprocess.run([str(python), "-m", "opsd_core", "list", "backends", "--json"], cwd=ROOT, env=environment,
                            capture_output=True, text=True)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert '"tiny-umm"' in listed.stdout and "thinkmorph" not in listed.stdout
    _run_tests(floors_env, paths)


@pytest.mark.floors
@pytest.mark.parametrize("group", ["thinkmorph", "janus-emu3"])
def test_plugins_at_their_floors(floors_env, group):
    projects, paths = GROUPS[group]
    _install(floors_env, projects)
    _run_tests(floors_env, paths)
