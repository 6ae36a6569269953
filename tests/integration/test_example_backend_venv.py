"""The example backend plugin installs into a fresh virtualenv and runs there, as a third
party's plugin would.

The virtualenv sees every site directory of the interpreter running the tests, whichever
it is (the system's, a virtualenv's, one with system site-packages, the user's): torch,
opsd-core and the other plugins are reused. That interpreter's pip and setuptools build a
wheel from a copy of the plugin's directory, and the virtualenv (which has no pip of its own)
installs it into its own site-packages: a real, non-editable install. Nothing is downloaded,
unless the running setuptools is older than the plugin's build needs (a fresh
``python -m venv`` brings an old one): then pip builds in isolation with setuptools from the
configured index. The running environment is never written to. When the development install also holds the plugin (editable, or on
PYTHONPATH), the test proves that the virtualenv's copy is the one discovered and imported.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import venv
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.venv

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "examples" / "opsd-example-backend"
OPSD = "import sys; from opsd_core.cli import main; sys.argv[0] = 'opsd'; main()"
WHERE = (
    "import importlib.metadata as m, opsd_example_backend; "
    "ep = [e for e in m.entry_points(group='opsd') if e.name == 'example-backend'][0]; "
    "print(opsd_example_backend.__file__); print(ep.dist.locate_file(''))"
)

SYSTEM_VIEW = (
    "import importlib.metadata as m\n"
    "try:\n    print(m.distribution('opsd-example-backend').locate_file(''))\n"
    "except m.PackageNotFoundError:\n    print('')"
)


def running_site_directories() -> list[str]:
    """The site directories this interpreter imports installed packages from, in its order: a
    virtualenv's own, then the base installation's when it sees them, then the user's."""
    directories = site.getsitepackages()
    if site.ENABLE_USER_SITE:
        directories.append(site.getusersitepackages())
    return [path for path in directories if Path(path).is_dir()]


def virtualenv_site(python: Path) -> Path:
    """The virtualenv's own site-packages, as its interpreter's install scheme names it."""
    asked = [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    return Path(subprocess.run(asked, capture_output=True, text=True, check=True).stdout.strip())


def builds_with_the_running_setuptools() -> bool:
    """Whether the setuptools of the running interpreter satisfies the plugin's build requirement."""
    requires = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["build-system"]["requires"]
    (needed,) = (Requirement(text) for text in requires)
    try:
        return needed.specifier.contains(metadata.version("setuptools"))
    except metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """(python of the virtualenv, its site-packages, the subprocess environment)."""
    root = tmp_path_factory.mktemp("venv")
    directory = root / "env"
    builder = venv.EnvBuilder(with_pip=False)
    builder.create(directory)
    python = Path(builder.ensure_directories(directory).env_exe)
    # The running interpreter's site directories, .pth files included, after the virtualenv's own.
    reuse = "".join(f"import site; site.addsitedir({path!r})\n" for path in running_site_directories())
    (virtualenv_site(python) / "_running_interpreter.pth").write_text(reuse)
    source = root / "opsd-example-backend"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    env = {key: value for key, value in os.environ.items() if key not in ("OPSD_LOAD_PLUGINS", "PIP_USER")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    if "PYTHONPATH" in env:  # a source checkout of the plugin on the path would shadow the install
        kept = [entry for entry in env["PYTHONPATH"].split(os.pathsep) if not Path(entry).resolve().is_relative_to(PLUGIN)]
        env["PYTHONPATH"] = os.pathsep.join(kept)
    wheels = root / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheels), str(source)]
    if builds_with_the_running_setuptools():
        build += ["--no-build-isolation", "--no-index"]
    built = subprocess.run(build, capture_output=True, text=True, env=env, cwd=root, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("*.whl")
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)]
    installed = subprocess.run(install, capture_output=True, text=True, env=env, cwd=root, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python, virtualenv_site(python), env


def opsd(environment, *arguments, cwd):
    python, _, env = environment
    command = [str(python), "-c", OPSD, *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=False)


def test_the_installed_copy_is_the_one_used(environment, tmp_path):
    python, site_packages, env = environment
    found = subprocess.run(
        [str(python), "-c", WHERE], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    )
    module_file, metadata = (Path(line).resolve() for line in found.stdout.split())
    site_packages = site_packages.resolve()
    assert module_file.is_relative_to(site_packages), f"imported from {module_file}, not the virtualenv"
    assert metadata.is_relative_to(site_packages), f"entry point read from {metadata}, not the virtualenv"
    # The running interpreter does not see the virtualenv's install: it went nowhere else.
    running = subprocess.run([sys.executable, "-c", SYSTEM_VIEW], capture_output=True, text=True, check=True)
    assert not running.stdout.strip() or not Path(running.stdout.strip()).resolve().is_relative_to(site_packages)


def test_opsd_lists_the_new_backend(environment, tmp_path):
    listed = opsd(environment, "list", "backends", cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("byte-umm"))
    assert line.split()[1] == "example-backend"


def test_opsd_run_trains_the_new_backend(environment, tmp_path):
    ran = opsd(
        environment,
        "run", str(PLUGIN / "byte-umm.toml"), "--no-progress",
        "--set", f"run.output_dir='{tmp_path}'",
        "--set", "schedule.total_steps=3",
        "--set", "schedule.warmup_steps=1",
        "--set", "train.samples_per_step=2",
        "--set", "train.log_every=1",
        "--set", "train.checkpoint_every=0",
        "--set", "sampling.max_completion_tokens=6",
        "--set", "eval.limit=2",
        "--set", "diagnostics.kl_samples=2",
        "--set", "experiment.noise_control=false",
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "Visual-OPSD" in ran.stdout
    directory = tmp_path / "byte-umm"
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["phase"] == "opsd"] == [1, 2, 3]
    results = json.loads((directory / "results.json").read_text())
    assert {"start", "opsd"} <= set(results)
    assert results["start"]["kl"] > 0 and 0.0 <= results["opsd"]["eval"]["student"]["accuracy"] <= 1.0
    config = (directory / "config.toml").read_text()
    assert 'name = "byte-umm"' in config and (directory / "report.md").is_file()
