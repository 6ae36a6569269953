"""The example backend plugin installs into a fresh virtualenv and runs there, as a third
party's plugin would.

The virtualenv sees the system site-packages (torch, opsd-core and the other plugins are
reused; nothing is downloaded) and has no pip of its own, so the system's pip and setuptools
build the plugin: a real, non-editable install from a copy of its directory. The system
environment is never written to. When the development install also holds the plugin
(editable), the test proves that the virtualenv's copy is the one discovered and imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

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


@pytest.fixture(scope="module")
def environment(tmp_path_factory):
    """(python of the virtualenv, its directory, the subprocess environment)."""
    root = tmp_path_factory.mktemp("venv")
    directory = root / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(directory)
    python = directory / "bin" / "python"
    source = root / "opsd-example-backend"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    env = {key: value for key, value in os.environ.items() if key not in ("OPSD_LOAD_PLUGINS", "PIP_USER")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(source)],
        capture_output=True, text=True, env=env, cwd=root, check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python, directory, env


def opsd(environment, *arguments, cwd):
    python, _, env = environment
    command = [str(python), "-c", OPSD, *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=False)


def test_the_installed_copy_is_the_one_used(environment, tmp_path):
    python, directory, env = environment
    found = subprocess.run(
        [str(python), "-c", WHERE], capture_output=True, text=True, env=env, cwd=tmp_path, check=True
    )
    module_file, metadata = (Path(line).resolve() for line in found.stdout.split())
    site = (directory / "lib").resolve()
    assert module_file.is_relative_to(site), f"imported from {module_file}, not the virtualenv"
    assert metadata.is_relative_to(site), f"entry point read from {metadata}, not the virtualenv"
    # The system interpreter does not see the virtualenv's install: it went nowhere else.
    system = subprocess.run([sys.executable, "-c", SYSTEM_VIEW], capture_output=True, text=True, check=True)
    assert not system.stdout.strip() or not Path(system.stdout.strip()).resolve().is_relative_to(directory.resolve())


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
