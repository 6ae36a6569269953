"""Benchmarks answered during training: a fixed subset of each, scored into scalars for the loggers.

Owns: choosing each benchmark's subset once (``eval.subset`` questions drawn with ``run.seed``,
kept in file order; a circular question brings all its option-rotated copies), answering it
greedily in text mode through the evaluation machinery of :mod:`opsd_core.evaluation.harness`
(the benchmark's prompt, the backend's system prompt, the run's greedy sampler), and the
scalars a training step logs: ``benchmark/<name>`` (the benchmark's reported accuracy, 0-100,
on the subset) and ``benchmark_s`` (the seconds it took).
Does not know: the trainer's loop or its loggers (the trainer calls :meth:`BenchmarkProbe.run`
every ``eval.every`` steps and logs what it returns), nor any particular benchmark.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opsd_core.evaluation.benchmarks import BenchmarkItem, BenchmarkTask, benchmark_tasks
from opsd_core.evaluation.evaluate import greedy_decode
from opsd_core.evaluation.harness import item_context
from opsd_core.evaluation.scorers import CIRCULAR_OFFSET
from opsd_core.interfaces import Backend, OnPolicySampler

SCALAR_PREFIX = "benchmark/"


def benchmark_probe(config: Any, registries: Any = None) -> BenchmarkProbe | None:
    """The probe a run config's ``[eval]`` asks for (None without ``eval.benchmarks``): its
    benchmark tasks found and their subsets read now, so a name that is no benchmark, or a
    missing or unreadable file, fails before training starts."""
    evaluation = config.eval
    if not evaluation.benchmarks:
        return None
    return BenchmarkProbe.build(
        evaluation.benchmarks, Path(evaluation.data_root), evaluation.subset, config.run.seed, evaluation.batch_size,
        registries,
    )


def fixed_subset(task: BenchmarkTask, items: list[BenchmarkItem], questions: int, seed: int) -> list[BenchmarkItem]:
    """``questions`` of ``items`` drawn with ``seed`` (all when there are fewer), in file order.
    A circular benchmark's question is drawn with every option-rotated copy (index + k * 1e6)."""
    groups: dict[int, list[BenchmarkItem]] = defaultdict(list)
    for item in items:
        groups[item.index % CIRCULAR_OFFSET if task.circular else item.index].append(item)
    chosen = set(random.Random(seed).sample(sorted(groups), min(questions, len(groups))))
    return [item for item in items if (item.index % CIRCULAR_OFFSET if task.circular else item.index) in chosen]


@dataclass
class BenchmarkProbe:
    """The benchmarks a training run evaluates every ``eval.every`` steps, each on its fixed subset.

    Attributes:
        tasks: benchmark name -> its task.
        items: benchmark name -> the items of its subset, in file order.
        batch_size: items answered together.
    """

    tasks: dict[str, BenchmarkTask]
    items: dict[str, list[BenchmarkItem]]
    batch_size: int

    @classmethod
    def build(
        cls, names: list[str], data_root: Path, questions: int, seed: int, batch_size: int, registries: Any = None
    ) -> BenchmarkProbe:
        """The probe of the installed benchmarks ``names``, their subsets read from ``data_root``
        now (a missing or unreadable file fails here, before training starts)."""
        tasks = benchmark_tasks(names, registries)
        items = {name: fixed_subset(task, task.items(Path(data_root)), questions, seed) for name, task in tasks.items()}
        return cls(tasks, items, batch_size)

    def run(self, backend: Backend, model: torch.nn.Module, sampler: OnPolicySampler) -> dict[str, float]:
        """Answer every subset greedily with ``model`` and return ``benchmark/<name>`` (accuracy,
        0-100) per benchmark and ``benchmark_s``."""
        started = time.perf_counter()
        scalars: dict[str, float] = {}
        for name, task in self.tasks.items():
            items = self.items[name]
            contexts = [item_context(backend, item, task=task) for item in items]
            with torch.no_grad():
                completions = greedy_decode(sampler, model, contexts, self.batch_size)
            hits = [task.verdict(item, backend.decode(tokens)).hit for item, tokens in zip(items, completions)]
            scalars[f"{SCALAR_PREFIX}{name}"] = float(task.figures(items, hits)["accuracy"])
        scalars["benchmark_s"] = time.perf_counter() - started
        return scalars
