"""The whole method as one experiment: what `opsd run` does.

Owns: the phases and their order (KL diagnostic and evaluation of the start checkpoint ->
OPSD -> evaluation -> noise control from the same start -> evaluation -> optional shuffled-VT
and SFT controls), what each phase records in ``results.json`` (the batch-1 text-vs-VT latency
among it) and hands the loggers (results,
and the media of the start checkpoint and of each trained student for the report's gallery),
and resuming an interrupted run phase by phase. The files themselves belong to
:class:`~opsd_core.rundir.RunDirectory`. In a multi-process run every rank runs every phase
(training sharded, evaluation and diagnostics on gathered weights, the same on every rank) and
rank 0 alone writes.
Does not know: any model family; it uses the roles and the trainer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from opsd_core import lora, runtime
from opsd_core.components import Components, build_components, direct_weight_reads
from opsd_core.config import RunConfig, lora_settings
from opsd_core.diagnostics.kl import gap_closure, gap_closure_standard_error, kl_gap
from opsd_core.diagnostics.media import media_samples, render_html
from opsd_core.evaluation import evaluate
from opsd_core.evaluation.periodic import benchmark_probe
from opsd_core.evaluation.evaluate import answer_latency
from opsd_core.images import save_png
from opsd_core.loggers.group import Loggers
from opsd_core.memory_census import refuse_unfit
from opsd_core.rundir import RunDirectory
from opsd_core.runtime import resolve_device
from opsd_core.trainer import offload, sharding, trainable
from opsd_core.trainer.trainer import Phase, Trainer


def phases(config: RunConfig) -> list[Phase]:
    """The training phases ``opsd run`` performs, in order."""
    chosen = [Phase("opsd")] if config.experiment.opsd else []
    if config.experiment.noise_control:
        chosen.append(Phase("noise", noise_vt=True))
    if config.experiment.shuffled_vt_control:
        chosen.append(Phase("shuffled", shuffled_vt=True))
    if config.experiment.sft_control:
        chosen.append(Phase("sft", sft=True))
    return chosen


class Experiment:
    """One run of the method from a start checkpoint; every phase result is saved as soon as
    it exists, so an interrupted run resumes where it stopped. ``ranks`` is this process among
    the training processes (default: a single process); ``loggers`` are rank 0's (default: the
    jsonl logger of ``run_dir``). With ``memory_check``, a run the memory planner says cannot
    fit this GPU is refused before the start model is built."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: RunDirectory,
        echo: Callable[[str], None] = print,
        progress: bool = True,
        ranks: runtime.Ranks | None = None,
        memory_check: bool = True,
        loggers: Loggers | None = None,
    ):
        self.ranks = ranks or runtime.Ranks()
        self._stage, self._trainer = "start-up (building the models)", None
        main = self.ranks.is_main
        if loggers is None:
            loggers = Loggers.of_metrics(run_dir.metrics) if main else Loggers()
        self.loggers = loggers
        self.config, self.run_dir = config, run_dir
        self.echo, self.progress = (echo if main else lambda message: None), progress and main
        runtime.apply_threads(config.run.threads)
        self.device = resolve_device(config.run.device)
        self.components: Components = build_components(config, world_size=self.ranks.world_size)
        # The eval.benchmarks subsets are read now: a name that is no benchmark, or a missing
        # file, stops the run before any weights exist.
        self.benchmarks = benchmark_probe(config, self.components.registries)
        self.backend = self.components.backend
        if memory_check:  # before any weights exist: a run that cannot fit is refused now
            refuse_unfit(self.components, self.ranks, self.ranks.device if self.ranks.distributed else self.device)
        # Several processes: the start model is sharded (skeleton: its weightless layout); it
        # waits in host memory, one shard per rank, while phases train (see start_model()).
        self.start, self.skeleton = sharding.build_start(self.backend, config, self.ranks, self.device)
        self._parked_start: dict[str, torch.Tensor] | None = None
        if config.train.optimizer_offload and self.skeleton is None:
            # Refused before the first phase writes anything, not when its trainer is built.
            frozen = trainable.frozen_names(self.backend, self.start)
            offload.check_host_memory(p for name, p in self.start.named_parameters() if name not in frozen)
        self.lora = lora_settings(config)
        if self.lora is not None:  # a bad target is refused before anything is written
            lora.check_adapters(self.start, self.lora, direct_weight_reads(self.components))
        self.eval_problems = list(self.components.task.eval_problems(config.eval.limit))
        self.results: dict[str, Any] = run_dir.read_results()

    def _save(self) -> None:
        if self.ranks.is_main:
            self.run_dir.write_results(self.results)

    def evaluate(self, model: torch.nn.Module, contexts: tuple[str, ...]) -> dict[str, dict]:
        results = evaluate(
            self.backend,
            model,
            self.components.task,
            self.eval_problems,
            contexts=contexts,
            batch_size=self.config.eval.batch_size,
            seed=self.config.run.seed,
            sampler=self.components.evaluation_sampler(),
        )
        return {name: result.summary() for name, result in results.items()}

    def latency(self, model: torch.nn.Module) -> dict[str, Any]:
        """Batch-1 answer time and length in the text and the VT context on the first
        ``eval.latency_problems`` evaluation problems (:func:`~opsd_core.evaluation.evaluate.answer_latency`)."""
        evaluation = self.config.eval
        return answer_latency(
            self.backend,
            model,
            self.eval_problems[: evaluation.latency_problems],
            self.components.evaluation_sampler(),
            evaluation.max_completion_tokens or self.config.sampling.max_completion_tokens,
            seed=self.config.run.seed,
        )

    def kl(
        self, name: str, sampler: torch.nn.Module, teacher: torch.nn.Module, student: torch.nn.Module, noise: bool = False
    ) -> dict[str, Any]:
        """The KL diagnostic as result fields: ``name``, ``name_se`` and ``name_samples`` (each
        sample's row-KL sum and rows, for paired comparisons). Every call uses the same problems
        and per-sample seeds, so estimates of two models are paired sample by sample."""
        diagnostics = self.config.diagnostics
        count = diagnostics.kl_samples
        problems = (self.eval_problems * (count // max(len(self.eval_problems), 1) + 1))[:count]
        estimate = kl_gap(
            self.backend,
            sampler,
            teacher,
            student,
            problems,
            noise=noise,
            batch_size=diagnostics.batch_size,
            seed=diagnostics.seed,
            sampler=self.components.sampler_with(),
        )
        return {name: estimate.mean, f"{name}_se": estimate.standard_error, f"{name}_samples": estimate.per_sample}

    def media(self, phase: str, step: int, student: torch.nn.Module, teacher: torch.nn.Module) -> list[dict[str, Any]]:
        """The media problems' greedy completions by ``student`` with the per-token KL from
        ``teacher`` in the teacher context, to the loggers; returns their summary for
        ``results.json`` (the report's gallery). Every rank computes it; rank 0 logs."""
        problems = self.eval_problems[: self.config.logging.media_problems]
        if not problems:
            return []
        samples = media_samples(self.backend, self.components.task, student, teacher, problems, self.components.evaluation_sampler())
        if self.ranks.is_main:
            title = f"{phase}, step {step}: student completions, KL(start teacher || student) per token"
            self.loggers.log_media(phase, step, samples, render_html(title, samples))
            for sample in samples:
                if sample.visual_thought is not None:
                    save_png(sample.visual_thought, self.run_dir.visual_thought_path(sample.problem_id), scale=4)
        return [
            {"problem_id": s.problem_id, "completion": s.completion, "mean_kl": s.mean_kl, "correct": s.correct}
            for s in samples
        ]

    def start_model(self) -> torch.nn.Module:
        """The start checkpoint's model, back on the device if it was parked."""
        if self.start is None:
            self.start = sharding.sharded_clone(self._parked_start, self.skeleton, self.backend, self.ranks, self.config)
            self.start.requires_grad_(False)
        return self.start

    def park_start(self) -> None:
        """With several processes, move the start model's shards to host memory until it is
        needed again (a single process keeps it where it is: it is not sharded)."""
        if self.skeleton is None or self.start is None:
            return
        if self._parked_start is None:
            self._parked_start = sharding.local_tensors(self.start)
        self.start = None
        runtime.release_cached_memory(self.ranks.device)

    def diagnose_start(self) -> dict[str, Any]:
        """KL diagnostic and three-context evaluation of the start checkpoint."""
        if "start" in self.results:
            return self.results["start"]
        self._stage = "the start checkpoint's diagnosis"
        self.echo("Diagnosing the start checkpoint: KL(teacher || student) and greedy accuracy...")
        started = time.perf_counter()
        start = self.start_model()
        with sharding.gathered(start):
            record = {
                **self.kl("kl", start, start, start),
                **self.kl("kl_noise", start, start, start, noise=True),
                "eval": self.evaluate(start, ("student", "teacher", "noise")),
                "latency": self.latency(start),
                "media": self.media("start", 0, start, start),
            }
        record["wall_s"] = time.perf_counter() - started
        self.results["start"] = record
        self._save()
        return record

    def train_phase(self, phase: Phase) -> dict[str, Any]:
        """Train ``phase`` from the start checkpoint, then evaluate it."""
        if phase.name in self.results:
            return self.results[phase.name]
        self._stage = f"phase {phase.name!r}, start-up"
        self.echo(f"Phase {phase.name!r}: training {self.config.schedule.total_steps} steps from the start checkpoint...")
        if self.lora is not None:  # the trainer adds adapters to the frozen start's tensors
            student = lora.base_sharing_copy(self.start_model())
        elif self.skeleton is None:
            student = trainable.student_from_start(self.backend, self.start_model())
        else:
            self.park_start()
            student = sharding.sharded_clone(self._parked_start, self.skeleton, self.backend, self.ranks, self.config)
            student.requires_grad_(True)
        components = self.components
        trainer = Trainer(
            components,
            student,
            self.run_dir.phase_dir(phase.name),
            self.run_dir.metrics,
            phase,
            self.ranks,
            skeleton=self.skeleton,
            loggers=self.loggers,
            benchmarks=self.benchmarks,
        )
        self.echo(f"Student: {trainer.parameter_counts.describe()}.")
        started = time.perf_counter()
        self._trainer = trainer
        trainer.fit(progress=self.progress)
        self._trainer, self._stage = None, f"phase {phase.name!r}, evaluation"
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        trainer.release_optimizer()
        student = trainer.student  # parallelize may have wrapped it
        # Sharded models are gathered one or two at a time, and the teacher is let go before
        # the start model comes back: with few GPUs, whole copies of three models do not fit.
        with sharding.gathered(trainer.teacher):
            teacher_eval = self.evaluate(trainer.teacher, ("teacher",))
        if self.skeleton is not None:
            trainer.teacher = None
            runtime.release_cached_memory(self.ranks.device)
        with sharding.gathered(student):
            record = {
                "eval": self.evaluate(student, ("student", "teacher")),
                "latency": self.latency(student),
                "teacher_eval": teacher_eval,
                **self.kl("kl", student, student, student),
            }
            start = self.start_model()
            with sharding.gathered(start):
                record |= self.kl("kl_t0", student, start, student)
                record["media"] = self.media(phase.name, self.config.schedule.total_steps, student, start)
        record |= {"train_s": train_s, "sampler_tokens_per_s": self._sampler_throughput(phase.name)}
        record["eval_s"] = time.perf_counter() - started
        self.results[phase.name] = record
        self._save()
        del trainer, student, start
        self.park_start()
        return record

    def where(self) -> str:
        """What the experiment is doing now, for an error message: the phase and, while it
        trains, the optimizer steps it has taken."""
        if self._trainer is not None:
            trainer = self._trainer
            return f"phase {trainer.phase.name!r} after {trainer.step} of {self.config.schedule.total_steps} optimizer steps"
        return self._stage

    def _sampler_throughput(self, phase: str) -> float | None:
        """Completion tokens sampled per second of sampling, over the phase's logged steps."""
        records = [r for r in self.run_dir.metrics.read(phase) if r.get("sample_s")]
        seconds = sum(r["sample_s"] for r in records)
        if not seconds:
            return None
        samples = self.config.train.samples_per_step * self.config.train.grad_accum
        return sum(r["completion_tokens"] * samples for r in records) / seconds

    def run(self) -> dict[str, Any]:
        """All phases, then the report; returns the results."""
        from opsd_core.diagnostics.report import write_report

        started = time.perf_counter()
        start = self.diagnose_start()
        accuracies = {f"{context}_accuracy": result["accuracy"] for context, result in start["eval"].items()}
        self.loggers.log_results("start", 0, accuracies | {"kl": start["kl"], "kl_noise": start["kl_noise"]})
        for phase in phases(self.config):
            record = self.train_phase(phase)
            record["gap_closure"] = gap_closure(start["kl"], record["kl_t0"])
            if "kl_samples" in start and "kl_t0_samples" in record:
                record["gap_closure_se"] = gap_closure_standard_error(start["kl_samples"], record["kl_t0_samples"])
            self.loggers.log_results(phase.name, self.config.schedule.total_steps, {
                "student_accuracy": record["eval"]["student"]["accuracy"],
                "teacher_accuracy": record["eval"]["teacher"]["accuracy"],
                "ema_teacher_accuracy": record["teacher_eval"]["teacher"]["accuracy"],
                "kl": record["kl"], "kl_t0": record["kl_t0"], "gap_closure": record["gap_closure"],
            })  # fmt: skip
        self.results["total_wall_s"] = self.results.get("total_wall_s", 0.0) + time.perf_counter() - started
        self._save()
        self._stage = "the report"
        if self.ranks.is_main:
            write_report(self.run_dir.path, self.results, self.config)
        return self.results
