"""opsd as a user installs it: the wheels of opsd-core, opsd-tiny and opsd-benchmarks built from this
repository, installed with their dependencies into a fresh virtualenv that sees nothing of the
development install, then run from an empty directory with no checkout in sight."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.venv

ROOT = Path(__file__).resolve().parents[2]
SHORT = [
    "schedule.total_steps=2", "schedule.warmup_steps=1", "train.samples_per_step=4", "train.checkpoint_every=0",
    "eval.limit=8", "diagnostics.kl_samples=4", "experiment.noise_control=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the virtualenv's bin directory, an empty working directory, a clean environment)."""
    root = tmp_path_factory.mktemp("wheels")
    wheels = root / "wheels"
    for project in (ROOT, ROOT / "plugins" / "opsd-tiny", ROOT / "plugins" / "opsd-benchmarks"):
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(project)],
            check=True,
        )
    environment = root / "env"
    venv.EnvBuilder(with_pip=True).create(environment)
    bin_dir = environment / "bin"
    built = sorted(str(path) for path in wheels.glob("*.whl"))
    clean = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "OPSD_LOAD_PLUGINS")}
    subprocess.run([str(bin_dir / "pip"), "install", "-q", "torch==2.13.0", *built], check=True, env=clean)
    work = root / "work"
    work.mkdir()
    return bin_dir, work, clean


def _opsd(installed, *arguments):
    bin_dir, work, environment = installed
    return subprocess.run([str(bin_dir / "opsd"), *arguments], cwd=work, env=environment, capture_output=True, text=True)


def test_the_installed_package_is_the_one_used_and_tiny_is_the_only_backend(installed):
    bin_dir, work, environment = installed
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import opsd_core, opsd_tiny; print(opsd_core.__file__); print(opsd_tiny.__file__)"],
        cwd=work, env=environment, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert all(str(bin_dir.parent) in line for line in where.stdout.splitlines())
    listed = _opsd(installed, "list", "backends", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"tiny-umm"' in listed.stdout and "thinkmorph" not in listed.stdout
    tasks = _opsd(installed, "list", "tasks")
    assert tasks.returncode == 0, tasks.stderr
    names = {line.split()[0] for line in tasks.stdout.splitlines() if line.strip()}
    assert {"vsp", "vispuzzle", "blink-jigsaw", "sat", "blink", "chartqa", "vstar", "mmvp", "cv-bench"} <= names
    module = subprocess.run([str(bin_dir / "python"), "-m", "opsd_core", "--help"], cwd=work, env=environment,
                            capture_output=True, text=True)  # fmt: skip
    assert module.returncode == 0 and "opsd" in module.stdout


def test_the_embedded_default_runs_from_an_empty_directory(installed):
    _, work, _ = installed
    examples = _opsd(installed, "examples")
    assert examples.returncode == 0 and "quickstart" in examples.stdout
    sets = [part for override in SHORT for part in ("--set", override)]
    run = _opsd(installed, "run", "--no-progress", *sets)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "runs" / "quickstart" / "report.md").is_file()
    assert (work / "runs" / "quickstart" / "results.json").is_file()
