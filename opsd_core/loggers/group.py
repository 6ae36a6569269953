"""The configured loggers of a run as one: every record goes to each of them.

Owns: checking, before a run starts, that each logger in ``logging.loggers`` is registered and
its packages are installed (one line naming the package and the pip command otherwise),
building them on rank 0 (the other ranks get an empty group), fanning records out, and closing
every one of them however the run ends.
Does not know: what any logger writes; the jsonl logger is always among them.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from opsd_core.errors import ConfigError
from opsd_core.interfaces.logger import Logger, MediaSample
from opsd_core.loggers.jsonl import JsonlLogger
from opsd_core.registry import Registry
from opsd_core.rundir import MetricsLog

ALWAYS_ON = "jsonl"
TRACKERS_EXTRA = "opsd-core[trackers]"


class Loggers:
    """A group of loggers that behaves as one logger (empty on ranks other than 0)."""

    def __init__(self, loggers: Sequence[Logger] = ()):
        self.loggers = list(loggers)

    @classmethod
    def of_metrics(cls, metrics: MetricsLog) -> Loggers:
        """Only the jsonl logger, writing ``metrics`` (its media pages beside it)."""
        return cls([JsonlLogger(metrics.path.parent, metrics=metrics)])

    def log_config(self, config: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_scalars(self, phase: str, step: int, scalars: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log_scalars(phase, step, scalars)

    def log_results(self, phase: str, step: int, results: Mapping[str, float]) -> None:
        for logger in self.loggers:
            logger.log_results(phase, step, results)

    def log_media(self, phase: str, step: int, samples: Sequence[MediaSample], html: str) -> None:
        for logger in self.loggers:
            logger.log_media(phase, step, samples, html)

    def close(self) -> None:
        """Close every logger, even when one of them fails to (the first failure is raised)."""
        failure = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as error:  # the others still get closed
                failure = failure or error
        self.loggers = []
        if failure is not None:
            raise failure


def logger_names(names: Sequence[str]) -> list[str]:
    """``logging.loggers`` with the always-on jsonl logger first, each name once."""
    return list(dict.fromkeys([ALWAYS_ON, *names]))


def check_loggers(names: Sequence[str], registry: Registry) -> None:
    """Raise one :class:`ConfigError` for a logger whose packages are not installed (an unknown
    name raises the registry's did-you-mean error)."""
    for name in logger_names(names):
        factory = registry.get(name).resolve()
        missing = [package for package in getattr(factory, "packages", ()) if importlib.util.find_spec(package) is None]
        if missing:
            raise ConfigError(
                f"logging.loggers: the {name!r} logger needs the package {', '.join(missing)!r}, which is not "
                f"installed (got {name!r}); pip install {' '.join(missing)}  (or pip install '{TRACKERS_EXTRA}')"
            )


@contextlib.contextmanager
def open_loggers(config: Any, run_dir: Path, registry: Registry, is_main: bool = True) -> Iterator[Loggers]:
    """The run's loggers for the block, given the resolved config; closed when it ends,
    however it ends. Ranks other than 0 get an empty group."""
    group = Loggers()
    try:
        if is_main:
            check_loggers(config.logging.loggers, registry)
            for name in logger_names(config.logging.loggers):
                group.loggers.append(registry.create(name, run_dir=run_dir, config=config))
            group.log_config(config.model_dump(mode="json"))
        yield group
    finally:
        group.close()
