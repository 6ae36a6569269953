"""The run directory: the one owner of a run's files, and the one reader of its metrics.

Owns: where each file of a run lives (``config.toml``, ``metrics.jsonl``, ``results.json``,
``report.md`` and plots, ``<phase>/checkpoints/step-NNNNNNN/``, ``media/<phase>-step-NNNNNNN.html``,
tracker files under ``trackers/``), creating the directory for a
new run and refusing to reuse another run's, writing the resolved config and the results atomically,
appending and reading metric lines (:class:`MetricsLog`), and the lock that makes one process
the only writer of a run directory (or a sweep directory) at a time.
Does not know: torch, what the metrics or results mean, or how checkpoints are written
(``trainer.checkpoint``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsd_core.errors import ConfigError, OpsdError

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
REPORT = "report.md"
LOCK = ".lock"
CHANGES = "changes.jsonl"
MEDIA = "media"
TRACKERS = "trackers"
_STEP_DIR = re.compile(r"^step-(\d{7})$")
# What may differ when a run is resumed: how it is launched, not what it computes.
LAUNCH_FIELDS = frozenset({"train.replicate", "train.shard", "run.threads"})


def step_dir_name(step: int) -> str:
    """The name of the checkpoint directory of optimizer step ``step``."""
    return f"step-{step:07d}"


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoint directories under ``checkpoints_dir`` by step (temporary ones excluded)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [path for path in checkpoints_dir.iterdir() if path.is_dir() and _STEP_DIR.match(path.name)]
    return sorted(found, key=lambda path: int(_STEP_DIR.match(path.name).group(1)))


def visual_thought_file(problem_id: str) -> str:
    """Where, relative to the run directory, a media problem's visual thought PNG lives."""
    return f"{MEDIA}/vt-{re.sub(r'[^A-Za-z0-9_.-]', '_', problem_id)}.png"


class RunDirectoryError(OpsdError):
    """A run directory that cannot be used as asked (held by another process, malformed files)."""


def _read_text(path: Path) -> str:
    """A run file's UTF-8 text; bytes that are not UTF-8 are a :class:`RunDirectoryError`."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise RunDirectoryError(
            f"{path}: not UTF-8 text (byte {error.start}); it was damaged outside opsd: restore it from a copy"
        ) from None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one rename, so readers see the old or the new file whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


@dataclass(frozen=True)
class MetricsLog:
    """The JSON lines of ``metrics.jsonl``: one record per logged optimizer step of a phase."""

    path: Path

    def read(self, phase: str | None = None) -> list[dict[str, Any]]:
        """Every record in order (only ``phase``'s when given). A last line cut by a crash is
        left out; a malformed line anywhere else is a :class:`RunDirectoryError`."""
        if not self.path.exists():
            return []
        lines = _read_text(self.path).splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the write a crash interrupted
                    break
                raise RunDirectoryError(f"{self.path}: line {number} is not a JSON record") from None
            if phase is None or record.get("phase") == phase:
                records.append(record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate(self, phase: str, step: int) -> None:
        """Drop ``phase``'s records after ``step`` (and a line cut by a crash): what a resume
        from the checkpoint of ``step`` will write again."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("phase") != phase or r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))


@dataclass(frozen=True)
class RunDirectory:
    """``output_dir/name`` of a run and every file in it."""

    path: Path

    @classmethod
    def of(cls, config: Any) -> RunDirectory:
        """The directory ``run.output_dir / run.name`` of a run config."""
        return cls(Path(config.run.output_dir) / config.run.name)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def report_path(self) -> Path:
        return self.path / REPORT

    @property
    def metrics(self) -> MetricsLog:
        return MetricsLog(self.path / METRICS)

    def media_path(self, phase: str, step: int) -> Path:
        """The HTML page of ``phase``'s media at optimizer ``step`` (its folder is created)."""
        folder = self.path / MEDIA
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{phase}-{step_dir_name(step)}.html"

    def visual_thought_path(self, problem_id: str) -> Path:
        """The PNG of a media problem's visual thought, for the report's gallery (folder created)."""
        (self.path / MEDIA).mkdir(parents=True, exist_ok=True)
        return self.path / visual_thought_file(problem_id)

    def tracker_dir(self, tracker: str) -> Path:
        """Where an experiment tracker keeps its files for this run (its folder is created)."""
        folder = self.path / TRACKERS / tracker
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def phase_dir(self, phase: str) -> Path:
        """Where a training phase keeps its ``checkpoints/``."""
        return self.path / phase

    def holds_run(self) -> bool:
        return self.config_path.is_file()

    def create(self, config_toml: str, resume: bool) -> None:
        """Make the directory for a new run and write its resolved config, or check that a
        resumed one holds a run; refuse to start a new run in another run's directory."""
        if self.holds_run() and not resume:
            raise ConfigError(
                f"run.name: {str(self.path)!r} already holds a run (got {self.path.name!r}); resume it with "
                f"`opsd run --resume {self.path}` or choose another run.name"
            )
        strangers = sorted(p.name for p in self.path.iterdir() if p.name != LOCK) if self.path.is_dir() else []
        if strangers and not self.holds_run():
            raise ConfigError(
                f"run.name: {str(self.path)!r} holds files ({', '.join(strangers[:3])}) but no {CONFIG}, so it is "
                "not a run directory; choose another run.name or output_dir"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        if not self.holds_run():
            write_atomic(self.config_path, config_toml)

    def discard_if_unstarted(self) -> bool:
        """Remove a run directory that holds nothing but its config (and lock): a run that failed
        before it produced anything, so that the corrected command can start afresh."""
        if not self.path.is_dir() or {p.name for p in self.path.iterdir()} - {CONFIG, LOCK}:
            return False
        for name in (CONFIG, LOCK):
            (self.path / name).unlink(missing_ok=True)
        self.path.rmdir()
        return True

    def resume_point(self) -> dict[str, Any]:
        """Where a resume continues: the finished phases and each phase's newest checkpoint step."""
        steps = {}
        for checkpoints in sorted(self.path.glob("*/checkpoints")):
            found = list_checkpoints(checkpoints)
            if found:
                steps[checkpoints.parent.name] = int(_STEP_DIR.match(found[-1].name).group(1))
        return {"finished_phases": sorted(self.read_results()), "checkpoint_steps": steps}

    def record_changes(self, changes: dict[str, tuple[Any, Any]], config_toml: str) -> None:
        """Append a resume's changed fields, and where the run stood, to ``changes.jsonl``; when
        anything beyond the launch layout changed, ``config.toml`` becomes ``config_toml``."""
        record = {
            "fields": {key: {"from": old, "to": new} for key, (old, new) in changes.items()},
            "resumed_at": self.resume_point(),
        }
        with (self.path / CHANGES).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if set(changes) - LAUNCH_FIELDS:
            note = "".join(
                f"# changed on resume ({CHANGES}): {key} = {old!r} -> {new!r}\n" for key, (old, new) in changes.items()
            )
            write_atomic(self.config_path, note + config_toml)

    def read_results(self) -> dict[str, Any]:
        """``results.json``: one record per finished phase (empty for a new run)."""
        if not self.results_path.exists():
            return {}
        try:
            results = json.loads(_read_text(self.results_path))
        except json.JSONDecodeError as error:
            raise RunDirectoryError(f"{self.results_path}: not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(results, dict):
            raise RunDirectoryError(f"{self.results_path}: expected an object of phase records, got an array or a value")
        for key, record in results.items():  # phase records, and wall times in seconds
            if not isinstance(record, dict) and not (key.endswith("_s") and isinstance(record, int | float)):
                kind = {str: "a string", list: "an array", bool: "a boolean"}.get(type(record), "a number")
                raise RunDirectoryError(f"{self.results_path}: {key!r} is {kind}, not a phase record")
        return results

    def write_results(self, results: dict[str, Any]) -> None:
        write_atomic(self.results_path, json.dumps(results, indent=2))

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Hold the run directory as its only writer for the block (see :func:`exclusive_lock`)."""
        return exclusive_lock(self.path, "wait for that run to end or choose another run.name")


@contextlib.contextmanager
def exclusive_lock(directory: Path, advice: str, kept_if: str = CONFIG) -> Iterator[None]:
    """Hold ``directory`` as its only writer for the block.

    An advisory ``flock`` on ``.lock``: the operating system releases it when the holder
    exits, however it exits, so a crash never leaves the directory locked. A second
    process is refused with the holder's pid and host, and ``advice``. When the block leaves
    no ``kept_if`` file in the directory (nothing came to be there), the lock file and the
    folders this call made are removed.
    """
    made = [folder for folder in (directory, *directory.parents) if not folder.exists()]  # innermost first
    lock_path = directory / LOCK
    made_lock, handle = not lock_path.exists(), None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirectoryError(f"{directory} is in use by {holder}; {advice}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        if handle is not None:
            handle.close()
        if not (directory / kept_if).is_file():  # nothing came to be here: leave the folders as they were
            if made_lock:
                lock_path.unlink(missing_ok=True)
            for folder in made:
                with contextlib.suppress(OSError):
                    folder.rmdir()
