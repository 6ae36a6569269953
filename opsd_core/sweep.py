"""``opsd sweep``: a grid of config values times seeds, each point an ``opsd run`` process.

Owns: parsing ``--grid KEY=V1,V2`` and ``--seeds`` (values as TOML literals, like ``--set``),
refusing bad input before any run starts (a key that is no config field, a value the config
rejects at any grid point, duplicate keys or values, empty values), naming each run's
directory after its grid point and seed, the sweep directory's manifest ``sweep.json`` (the
grid, the command, each run's status), launching up to ``jobs`` runs at a time with
``run.threads`` set so that jobs x threads never exceeds the cores (nor a ``--set run.threads``
cap), and resuming an
interrupted sweep: a finished run is skipped, a started one continues with
``opsd run --resume``.
Does not know: torch, what a run computes, or how the comparison report is built
(``diagnostics.comparison``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from opsd_core.config import flat_fields, load_config, parse_override
from opsd_core.errors import ConfigError, closest_match
from opsd_core.rundir import CONFIG, RunDirectory, exclusive_lock, write_atomic

MANIFEST = "sweep.json"
LOGS = "logs"
# Fields the sweep sets itself, and what to use instead of a grid over them.
_SWEEP_OWNED = {
    "run.name": "the sweep names each run after its grid point and seed",
    "run.output_dir": "the runs go under the sweep directory (--out)",
    "run.seed": "use --seeds",
    "run.threads": "the sweep sets it from --jobs and the cores (--set run.threads=N caps it)",
}
_NAME_LIMIT = 150


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid KEY=V1,V2,...``: a dotted config field and its values, parsed as TOML
    literals (``raw`` keeps them as written, for ``--set``)."""

    key: str
    values: tuple[Any, ...]
    raw: tuple[str, ...]


def split_values(text: str) -> list[str]:
    """``"1,[2,3],'a,b'"`` -> ``["1", "[2,3]", "'a,b'"]``: commas inside brackets, braces or
    quotes belong to a value."""
    values, current, depth, quote = [], [], 0, ""
    for character in text:
        if quote:
            quote = "" if character == quote else quote
        elif character in "'\"":
            quote = character
        elif character in "[{":
            depth += 1
        elif character in "]}":
            depth -= 1
        elif character == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(character)
    values.append("".join(current).strip())
    return values


def parse_grid(options: Sequence[str]) -> list[GridAxis]:
    """The axes of ``--grid`` options; a ConfigError for a malformed one, a key given twice,
    an empty value or a value given twice."""
    axes: list[GridAxis] = []
    for option in options:
        key, sep, listed = option.partition("=")
        key = key.strip()
        if not sep or not key or any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"--grid {option!r}: write KEY=V1,V2,... with KEY a config field such as optim.lr")
        if key in {axis.key for axis in axes}:
            raise ConfigError(f"--grid {key}: the key is given twice; list all its values in one --grid {key}=V1,V2")
        raw = split_values(listed)
        if any(not value for value in raw):
            raise ConfigError(f"--grid {option!r}: empty value; write KEY=V1,V2,... with no empty entries")
        values = tuple(parse_override(f"{key}={value}")[1] for value in raw)
        seen: list[Any] = []
        for value, written in zip(values, raw):
            if value in seen:
                raise ConfigError(f"--grid {key}: the value {written} is given twice")
            seen.append(value)
        axes.append(GridAxis(key, values, tuple(raw)))
    return axes


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; a ConfigError unless distinct non-negative integers."""
    seeds = []
    for part in text.split(","):
        if not part.strip().isdigit():
            raise ConfigError(f"--seeds {text!r}: write distinct non-negative integers separated by commas, e.g. 0,1,2")
        seeds.append(int(part))
    if any(seed > 2**63 - 1 for seed in seeds):
        raise ConfigError(f"--seeds {text!r}: a seed must be below 2**63")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is given twice")
    return tuple(seeds)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: a grid point (key -> value, and the values as written), a seed,
    and the ``--set`` assignments of every run of the sweep."""

    name: str
    point: dict[str, Any]
    raw: dict[str, str]
    seed: int
    common: tuple[str, ...] = ()

    def overrides(self) -> list[str]:
        """The ``--set`` assignments of this run: the sweep's, then its grid point and seed."""
        return [*self.common, *(f"{key}={value}" for key, value in self.raw.items()), f"run.seed={self.seed}"]


def _check_keys(axes: Sequence[GridAxis], base: Any, config_path: Path) -> None:
    fields = flat_fields(base.model_dump(mode="json"))
    for axis in axes:
        if axis.key in _SWEEP_OWNED:
            raise ConfigError(f"--grid {axis.key}: not a grid key; {_SWEEP_OWNED[axis.key]}")
        # A field under an absent optional table (e.g. backend.lora.rank) is checked with the grid points.
        under_absent = any(fields[key] is None and axis.key.startswith(key + ".") for key in fields)
        if axis.key not in fields and not under_absent:
            close = closest_match(axis.key, fields)
            hint = f" (did you mean {close}?)" if close else "; `opsd config` prints every field"
            raise ConfigError(f"--grid {axis.key}: not a field of the config {config_path}{hint}")


def _describe(point: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in point.items())


def run_names(points: Sequence[dict[str, str]], seeds: Sequence[int]) -> list[str]:
    """A directory name for each (grid point, seed), in ``product(points, seeds)`` order: the
    point's ``key=value`` pairs and the seed, with a hash of the point added to every name
    when cleaning them for a file system makes two alike or one too long."""
    readable, hashed = [], []
    for point, seed in product(points, seeds):
        text = "_".join([*(f"{key}={value}" for key, value in point.items()), f"seed={seed}"])
        readable.append(re.sub(r"[^A-Za-z0-9_.=+-]", "-", text))
        digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]
        hashed.append(f"{readable[-1][:_NAME_LIMIT]}-{digest}")
    if len(set(readable)) < len(readable) or max(len(name) for name in readable) > _NAME_LIMIT:
        return hashed
    return readable


def plan_sweep(
    config_path: Path, axes: Sequence[GridAxis], seeds: Sequence[int], overrides: Sequence[str] = ()
) -> list[PlannedRun]:
    """Every run of the grid times the seeds, after validating the config of every grid point
    (``overrides``, the ``--set`` of every run, apply first; a ConfigError names the first
    point the config rejects)."""
    base = load_config(config_path, overrides)
    set_keys = [".".join(parse_override(override)[0]) for override in overrides]
    for key in set_keys:
        if key in _SWEEP_OWNED and key != "run.threads":  # --set run.threads caps each run's threads
            raise ConfigError(f"--set {key}: the sweep sets it; {_SWEEP_OWNED[key]}")
    for axis in axes:
        if axis.key in set_keys:
            raise ConfigError(f"--grid {axis.key}: also given with --set; keep one of them")
    _check_keys(axes, base, config_path)
    points_raw = [dict(zip([a.key for a in axes], combo)) for combo in product(*(a.raw for a in axes))]
    points = [dict(zip([a.key for a in axes], combo)) for combo in product(*(a.values for a in axes))]
    for point in points_raw:
        assignments = [*overrides, *(f"{key}={value}" for key, value in point.items()), f"run.seed={seeds[0]}"]
        try:
            load_config(config_path, assignments)
        except ConfigError as error:
            raise ConfigError(f"--grid point {_describe(point)}: {error}") from None
    names = iter(run_names(points_raw, seeds))
    return [
        PlannedRun(next(names), point, raw, seed, tuple(overrides))
        for point, raw in zip(points, points_raw)
        for seed in seeds
    ]


def run_is_finished(directory: Path) -> bool:
    """Whether ``opsd run`` completed in ``directory``: every phase evaluated and the report written."""
    run_dir = RunDirectory(directory)
    return run_dir.report_path.is_file() and "total_wall_s" in run_dir.read_results()


def run_status(directory: Path) -> str:
    """``finished``, ``interrupted`` (started, not finished: it resumes) or ``pending``."""
    if run_is_finished(directory):
        return "finished"
    return "interrupted" if (directory / CONFIG).is_file() else "pending"


def _config_digest(config_path: Path) -> str:
    return hashlib.sha256(config_path.read_bytes()).hexdigest()


@dataclass
class Sweep:
    """A sweep directory: the planned runs, the manifest, and the processes that run them.

    Attributes:
        directory: the sweep directory; each run's directory and ``logs/NAME.log`` are inside.
        config_path: the base run config.
        axes: the grid.
        seeds: the seeds of every grid point.
        overrides: the ``--set`` assignments of every run.
        runs: the planned runs, grid order then seed.
        command: the command line that started the sweep, as recorded in the manifest.
        wall_s: seconds the sweep has run, over every command that worked on it.
    """

    directory: Path
    config_path: Path
    axes: list[GridAxis]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    runs: list[PlannedRun]
    command: str
    wall_s: float = 0.0

    def manifest(self, statuses: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "config": str(self.config_path),
            "config_sha256": _config_digest(self.config_path),
            "command": self.command,
            "set": list(self.overrides),
            "grid": {axis.key: list(axis.values) for axis in self.axes},
            "seeds": list(self.seeds),
            "wall_s": self.wall_s,
            "runs": [
                {"name": run.name, "point": run.point, "seed": run.seed, **statuses.get(run.name, {"status": "pending"})}
                for run in self.runs
            ],
        }

    def check_existing_manifest(self) -> None:
        """Refuse a sweep directory that holds another sweep (another config, grid or seeds)."""
        path = self.directory / MANIFEST
        if not path.is_file():
            return
        recorded = json.loads(path.read_text(encoding="utf-8"))
        ours = self.manifest({})
        differing = [field for field in ("config_sha256", "set", "grid", "seeds") if recorded.get(field) != ours[field]]
        if differing:
            raise ConfigError(
                f"--out {self.directory}: it holds a sweep with another {' and '.join(f.split('_')[0] for f in differing)} "
                f"(started with: {recorded.get('command')}); repeat that command to resume it, or choose another --out"
            )
        self.wall_s = recorded.get("wall_s", 0.0)

    def write_manifest(self, statuses: dict[str, dict[str, Any]], report: dict[str, Any] | None = None) -> None:
        manifest = self.manifest(statuses)
        if report is not None:
            manifest["report"] = report
        write_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=2))

    def run_command(self, run: PlannedRun, threads: int) -> list[str]:
        """The ``opsd run`` process of ``run``: a new run, or ``--resume`` of a started one."""
        opsd = [sys.executable, "-m", "opsd_core", "run", "--no-progress"]
        launch = ["--set", f"run.threads={threads}"]  # last: it wins over a --set of the sweep
        directory = self.directory / run.name
        if (directory / CONFIG).is_file():
            return [*opsd, "--resume", str(directory), *launch]
        located = [f"run.output_dir={json.dumps(str(self.directory))}", f"run.name={json.dumps(run.name)}"]
        sets = [part for override in [*located, *run.overrides()] for part in ("--set", override)]
        return [*opsd, str(self.config_path), *sets, *launch]

    def execute(self, jobs: int, threads: int, echo: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
        """Run every run not finished yet, ``jobs`` at a time; each run's status (finished,
        failed with its exit code) as the manifest records it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / LOGS).mkdir(exist_ok=True)
        statuses = {run.name: {"status": run_status(self.directory / run.name)} for run in self.runs}
        waiting = [run for run in self.runs if statuses[run.name]["status"] != "finished"]
        skipped = len(self.runs) - len(waiting)
        if skipped:
            echo(f"{skipped} of {len(self.runs)} runs already finished; skipping them.")
        running: dict[str, tuple[subprocess.Popen, Any]] = {}
        earlier_s, started = self.wall_s, time.monotonic()
        self.write_manifest(statuses)
        # SIGTERM ends the sweep as Ctrl-C does: through the cleanup below, which stops its runs.
        previous = signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    run = waiting.pop(0)
                    resumed = statuses[run.name]["status"] == "interrupted"
                    log = (self.directory / LOGS / f"{run.name}.log").open("a", encoding="utf-8")
                    command = self.run_command(run, threads)
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                    running[run.name] = (process, log)
                    statuses[run.name] = {"status": "running"}
                    echo(f"{'resuming' if resumed else 'starting'} {run.name}")
                    self.write_manifest(statuses)
                time.sleep(0.2)
                self.wall_s = earlier_s + time.monotonic() - started
                for name, (process, log) in list(running.items()):
                    code = process.poll()
                    if code is None:
                        continue
                    log.close()
                    del running[name]
                    if code == 0 and run_is_finished(self.directory / name):
                        statuses[name] = {"status": "finished"}
                        echo(f"finished {name}")
                    else:
                        statuses[name] = {"status": "failed", "exit_code": code}
                        echo(f"FAILED {name} (exit code {code}; see {self.directory / LOGS / name}.log)")
                    self.write_manifest(statuses)
        finally:
            for name, (process, log) in running.items():  # interrupted: stop the runs, which resume later
                process.terminate()
                process.wait()
                log.close()
                statuses[name] = {"status": "interrupted"}
            self.wall_s = earlier_s + time.monotonic() - started
            self.write_manifest(statuses)
            signal.signal(signal.SIGTERM, previous)
        return statuses


def open_sweep(
    config_path: Path, grid: Sequence[str], seeds: Sequence[int], overrides: Sequence[str], directory: Path, command: str
) -> Sweep:
    """The sweep of ``grid`` times ``seeds`` on ``config_path`` with ``overrides`` in
    ``directory``, validated whole before anything is written."""
    axes = parse_grid(grid)
    runs = plan_sweep(config_path, axes, seeds, overrides)
    sweep = Sweep(directory, config_path.resolve(), axes, tuple(seeds), tuple(overrides), runs, command)
    sweep.check_existing_manifest()
    return sweep


def hold_sweep(directory: Path):
    """The lock that keeps a second ``opsd sweep`` out of ``directory`` while one runs there."""
    return exclusive_lock(directory, "wait for that sweep to end or choose another --out", kept_if=MANIFEST)


def finished_runs(sweep: Sweep) -> list[PlannedRun]:
    """The runs of ``sweep`` whose directory holds a finished run, in grid order."""
    return [run for run in sweep.runs if run_is_finished(sweep.directory / run.name)]
