"""The Visual-OPSD training loop.

Owns: one optimizer step, read top to bottom: sample on-policy in the student context ->
teacher forward in the privileged context under no_grad -> student forward -> divergence ->
backward; then clipping, AdamW, the schedule and the teacher update. Also the noise, shuffled-VT
and SFT controls (flags of the same loop), the step's scalars, the student's accuracy on the
``eval.benchmarks`` subsets every ``eval.every`` steps and periodic media for the loggers, and
resumable checkpoints (of the adapters alone when ``[backend.lora]`` puts LoRA adapters on the
student, see ``opsd_core.lora``). In a multi-process
run every rank runs this same loop on its share of each step's problems, with the student and
teacher sharded by the backend (``opsd_core.runtime`` holds what the ranks exchange, ``sharding.py`` the sharded models).
Does not know: any model, task or divergence; everything goes through the role interfaces.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opsd_core import lora, runtime
from opsd_core.components import Components, direct_weight_reads
from opsd_core.evaluation.periodic import BenchmarkProbe, benchmark_probe
from opsd_core.config import lora_settings
from opsd_core.contexts.noise import with_noise_visual_thought
from opsd_core.contexts.shuffled import donors
from opsd_core.diagnostics.media import media_samples, render_html
from opsd_core.divergences import kl_divergence
from opsd_core.errors import CheckpointError, ConfigError, NonFiniteError
from opsd_core.loggers.group import Loggers
from opsd_core.parallel import checkpoint_forward
from opsd_core.rundir import MetricsLog
from opsd_core.sampling import sample_seed
from opsd_core.trainer import checkpoint, offload, optimizer_state, sharded_state, sharding, trainable
from opsd_core.trainer.loss import micro_batch_loss, token_cross_entropy
from opsd_core.trainer.schedule import build_scheduler
from opsd_core.types import (
    CompletionBatch,
    CompletionLogits,
    Context,
    ContextPair,
    Problem,
)


@dataclass(frozen=True)
class Phase:
    """What a training phase optimises.

    Attributes:
        name: the phase name in metrics and directories (``opsd``, ``noise``, ``shuffled``, ``sft``).
        noise_vt: the teacher sees N(0, 1) noise instead of the visual thought.
        shuffled_vt: the teacher sees the visual thought of another problem of the same step
            (:func:`~opsd_core.contexts.shuffled.derangement`).
        sft: cross-entropy on the task's text-only reference traces instead of distillation.
    """

    name: str
    noise_vt: bool = False
    shuffled_vt: bool = False
    sft: bool = False


class Trainer:
    """Trains ``student`` with OPSD (or a control) and writes metrics and checkpoints.

    Args:
        components: the run's roles, built and checked by
            :func:`~opsd_core.components.build_components` (its config is the resolved run config).
        student: the model to train (its weights are updated in place; with ``[backend.lora]``
            its adapters are added to it here and its other parameters frozen).
        phase_dir: where this phase writes ``checkpoints/``.
        metrics: the run's metric lines (shared by phases; lines carry the phase): resume cuts
            them back to the checkpoint, and non-finite steps are recorded there.
        phase: OPSD, or the noise, shuffled-VT or SFT control.
        ranks: this process among the training processes (default: a single process). With
            more than one, ``student`` and its teacher are sharded by ``backend.parallelize``.
        skeleton: with several processes, the weightless unsharded model of an already sharded
            ``student`` (see :func:`~opsd_core.trainer.sharding.build_start`); the teacher is
            then cloned from the student's shards. None: ``student`` is whole and is sharded here.
        loggers: where each logged step's scalars and the media go (rank 0's; empty elsewhere).
            None: only ``metrics`` (the jsonl logger).
        benchmarks: the ``eval.benchmarks`` subsets answered every ``eval.every`` steps (see
            :func:`~opsd_core.evaluation.periodic.benchmark_probe`); None: built here from the config.
    """

    def __init__(
        self,
        components: Components,
        student: torch.nn.Module,
        phase_dir: Path,
        metrics: MetricsLog,
        phase: Phase = Phase("opsd"),
        ranks: runtime.Ranks | None = None,
        skeleton: torch.nn.Module | None = None,
        loggers: Loggers | None = None,
        benchmarks: BenchmarkProbe | None = None,
    ):
        config = components.config
        self.config, self.backend, self.task = config, components.backend, components.task
        self.divergence, self.teacher_update, self.phase = components.divergence, components.teacher_update, phase
        self.builder, self.sampler = components.context, components.sampler
        self.evaluation_sampler = components.evaluation_sampler()
        self.benchmarks = benchmarks if benchmarks is not None else benchmark_probe(config, components.registries)
        # Decided once: a divergence on hidden states never sees the (B, T, V) logits.
        self.hidden_states = components.divergence.uses_hidden_states
        backend, teacher_update = self.backend, self.teacher_update
        self.ranks = ranks or runtime.Ranks()
        self.ranks.share(config.train.samples_per_step, "train.samples_per_step")  # fail now, not at step 1
        self.device = next(student.parameters()).device
        # The backend's frozen parameters take no gradient, no optimizer state and no EMA.
        trainable.freeze(backend, student)
        # Checkpoints leave these out (see checkpoint.py); the start checkpoint supplies them.
        self._frozen = {name for name, parameter in student.named_parameters() if not parameter.requires_grad}
        self._start_record: dict[str, Any] | None = None
        if skeleton is not None:
            trainable.freeze(backend, skeleton)
        # [backend.lora]: the student trains adapters only; the teacher copies them and shares
        # the frozen base weights; checkpoints hold the adapters.
        self.lora = lora_settings(config)
        if self.lora is not None:
            lora.check_adapters(student, self.lora, direct_weight_reads(components))
            lora.attach_adapters(student, self.lora, seed=config.run.seed)
        self.parameter_counts = trainable.parameter_counts(student)
        if self.ranks.distributed and skeleton is not None:
            # Already sharded: the teacher is made from the student's shards, never whole.
            self.student, self._student_skeleton = student, skeleton
            self._teacher_skeleton = teacher_update.create(skeleton)
            self.teacher = sharding.sharded_clone(student, self._teacher_skeleton, backend, self.ranks, config)
        else:
            teacher = teacher_update.create(student)
            self.student, self._student_skeleton = sharding.shard(backend, student, self.ranks, config)
            self.teacher, self._teacher_skeleton = sharding.shard(backend, teacher, self.ranks, config)
        if config.train.activation_checkpointing and not self.ranks.distributed:
            recompute_layers(backend, self.student)  # after the teacher's copy: it runs without grad anyway
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.student.parameters() if p.requires_grad],
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        self.state_offload = None
        if config.train.optimizer_offload:
            offload.check_host_memory(p for group in self.optimizer.param_groups for p in group["params"])
            self.state_offload = offload.OptimizerOffload(self.optimizer)
        schedule = config.schedule
        self.scheduler = build_scheduler(
            self.optimizer, schedule.warmup_steps, schedule.total_steps, optim.lr, schedule.min_lr
        )
        # Rank 0 draws the single-process stream; other ranks draw their own.
        self.generator = torch.Generator(device=self.device).manual_seed(config.run.seed + self.ranks.rank)
        self.checkpoints_dir = phase_dir / "checkpoints"
        self.metrics = metrics
        self.loggers = loggers if loggers is not None else Loggers.of_metrics(metrics)
        self.step = 0
        self.position = 0
        self._problems: Iterator[Problem] | None = None

    # ----------------------------------------------------------------- one optimizer step
    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics (averaged
        over ranks: each rank's are means over its equal share of the step's samples)."""
        train = self.config.train
        samples_per_step = train.samples_per_step * train.grad_accum // self.ranks.world_size  # this rank's share
        timings = {"visual_thought_s": 0.0, "sample_s": 0.0, "teacher_s": 0.0, "student_s": 0.0}
        loss_total, kl_total, tokens, finished = 0.0, 0.0, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = self._step_problems()
        whole_step = self.config.sampling.whole_step and not self.phase.sft and train.grad_accum > 1
        prepared = [self._prepare_micro_batch(*part, timings) for part in micro_batches] if whole_step else []
        drawn = self._sample_together(prepared, timings) if whole_step else []
        for index in range(train.grad_accum):
            if whole_step:
                problems, students, teachers, seeds = prepared[index]
                completions = drawn[index]
            else:
                problems, students, teachers, seeds = self._prepare_micro_batch(*micro_batches[index], timings)
            if self.phase.sft:
                started = time.perf_counter()
                loss = self._sft_loss(students, problems, samples_per_step)
                timings["student_s"] += time.perf_counter() - started
            else:
                if not whole_step:
                    (completions,) = self._sample_together([(problems, students, teachers, seeds)], timings)

                # A divergence on hidden states takes final hidden states and the lm_head weight
                # instead of logits, so the student's (B, T, V) logits never exist.
                fused = self.hidden_states
                rows_of = self.backend.completion_hidden if fused else self.backend.completion_logits
                started = time.perf_counter()
                with torch.no_grad(), self._precision():
                    teacher_rows = rows_of(self.teacher, teachers, completions)
                timings["teacher_s"] += time.perf_counter() - started

                started = time.perf_counter()
                with self._precision():
                    student_rows = rows_of(self.student, students, completions)
                    if fused:
                        # Inside the forward's precision: the fused loss does the lm_head products.
                        per_row, kl_rows = self.divergence.per_token_hidden(
                            student_rows.hidden,
                            teacher_rows.hidden,
                            student_rows.weight,
                            student_rows.mask,
                            teacher_weight=teacher_rows.weight,
                            with_kl=True,
                        )
                if fused:
                    # kl is then KL(teacher || student) over the teacher's top-K support, both
                    # renormalised on it, from the loss's own top-K logits (docs/divergences.md).
                    kl_total += float(micro_batch_loss(kl_rows, student_rows.mask, samples_per_step))
                else:
                    per_row = self.divergence.per_token(student_rows.logits, teacher_rows.logits, student_rows.mask)
                    kl_total += self._kl_share(student_rows, teacher_rows, samples_per_step)
                loss = micro_batch_loss(per_row, student_rows.mask, samples_per_step)
                timings["student_s"] += time.perf_counter() - started
                tokens += int(completions.lengths.sum())
                finished += int(completions.finished.sum())
            started = time.perf_counter()
            loss.backward()
            timings["student_s"] += time.perf_counter() - started
            loss_total += float(loss.detach())

        grad_norm = self._clip_gradients()
        lr = self.optimizer.param_groups[0]["lr"]  # what this step's update uses
        metrics = {"loss": loss_total, "grad_norm": grad_norm, "lr": lr}
        if not self.phase.sft:
            metrics["kl"] = kl_total
            metrics["completion_tokens"] = tokens / samples_per_step
            metrics["finished"] = finished / samples_per_step
        # Averaged before the update, so every rank takes the same decision on a non-finite step.
        metrics = self.ranks.mean(metrics | timings, skip=("grad_norm", "lr"))
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if finite:
            if self.state_offload is not None:
                self.state_offload.step()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.teacher_update.update(self.teacher, self.student)
        else:
            self._non_finite_step(metrics)
            with warnings.catch_warnings():  # the schedule advances past the dropped update on purpose
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                self.scheduler.step()
        self.step += 1
        return metrics

    def _non_finite_step(self, metrics: dict[str, float]) -> None:
        """Record a step whose loss or gradient norm is not finite; then stop the run (the last
        checkpoint stays the newest) or, with ``train.on_non_finite = "skip"``, drop its update."""
        action = self.config.train.on_non_finite
        step = self.step + 1
        if self.ranks.is_main:
            self.metrics.append(
                {"phase": self.phase.name, "step": step, "event": "non-finite", "action": action,
                 "loss_value": repr(metrics["loss"]), "grad_norm_value": repr(metrics["grad_norm"])}
            )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        if action == "stop":
            raise NonFiniteError(
                f"phase {self.phase.name!r}, step {step}: loss {metrics['loss']!r}, gradient norm "
                f"{metrics['grad_norm']!r}; the run stopped before applying it (its last checkpoint is kept). "
                "Lower optim.lr or raise optim.eps, or set train.on_non_finite = 'skip' to drop such steps"
            )

    def _step_problems(self) -> list[tuple[int, list[Problem], list[Problem]]]:
        """The step's problems on all ranks, per micro-batch: ``(stream position of its first
        problem, its problems, the problems whose visual thoughts their teachers see)``. The
        latter are the problems themselves, except in the shuffled-VT control, where they are a
        derangement of the whole step's problems keyed by the run seed and the step."""
        per_micro_batch, first = self.config.train.samples_per_step, self.position
        problems = self._next_problems(per_micro_batch * self.config.train.grad_accum)
        sources = donors(problems, self.config.run.seed, self.step) if self.phase.shuffled_vt else problems
        return [
            (first + start, problems[start : start + per_micro_batch], sources[start : start + per_micro_batch])
            for start in range(0, len(problems), per_micro_batch)
        ]

    def _prepare_micro_batch(
        self, first: int, everyone: list[Problem], sources: list[Problem], timings: dict[str, float]
    ):
        """This rank's share of a micro-batch (``everyone``, from stream position ``first``)
        with their student and teacher contexts (visual thoughts, those of ``sources``, drawn;
        the noise control's noise in place) and sampling seeds.

        A problem's seed is keyed by its position in the problem stream, so its completion is
        the same whichever rank samples it, in whichever batch (the sampler's draws depend only
        on a row's seed): runs on any number of processes, with or without whole-step sampling,
        sample the same completions.
        """
        problems = self.ranks.local_slice(everyone)
        seeds = self.ranks.local_slice([sample_seed(self.config.run.seed, first + i) for i in range(len(everyone))])
        pairs = self._context_pairs(problems, self.ranks.local_slice(sources), timings)
        students = [pair.student for pair in pairs]
        teachers = None if self.phase.sft else [self._teacher_context(pair.teacher) for pair in pairs]
        return problems, students, teachers, seeds

    def _sample_together(self, micro_batches, timings: dict[str, float]) -> list[CompletionBatch]:
        """On-policy completions of the student contexts of ``micro_batches``, decoded as one
        batch (with the weights gathered once), cut to the forward cap and split back per
        micro-batch."""
        started = time.perf_counter()
        contexts = [context for _, students, _, _ in micro_batches for context in students]
        seeds = [seed for *_, part in micro_batches for seed in part]
        self.student.eval()
        # Decoders kept by evaluation go before sampling, and this step's after it: the forwards
        # that follow (and the memory planner's stages) hold no decoding cache.
        self.backend.release_decoding_memory()
        with sharding.gathered(self.student):
            completions = self.sampler.sample(self.student, contexts, seeds=seeds)
        self.backend.release_decoding_memory()
        self.student.train()
        parts, first = [], 0
        for _, students, teachers, _ in micro_batches:
            part = completions.select(range(first, first + len(students)))
            parts.append(self._fit_forward_cap(teachers, part))
            first += len(students)
        timings["sample_s"] += time.perf_counter() - started
        return parts

    # ----------------------------------------------------------------- the loop
    def fit(self, progress: bool = True) -> None:
        """Train to ``schedule.total_steps``, resuming from this phase's last checkpoint."""
        from tqdm.auto import tqdm

        self.resume()
        total = self.config.schedule.total_steps
        shown_here = progress and self.ranks.is_main
        bar = tqdm(total=total, initial=self.step, desc=self.phase.name, disable=not shown_here, dynamic_ncols=True)
        with bar:
            while self.step < total:
                started = time.perf_counter()
                metrics = self.train_step()
                metrics["step_s"] = time.perf_counter() - started
                benchmarks = self.evaluate_benchmarks()
                self._log(metrics | benchmarks, always=bool(benchmarks))
                media_every = self.config.logging.media_every
                if media_every and self.step % media_every == 0 and self.step != total:
                    self.log_media()
                bar.update(1)
                shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
                if "kl" in metrics:
                    shown["kl"] = f"{metrics['kl']:.3f}"
                bar.set_postfix(shown)
                every = self.config.train.checkpoint_every
                if self.step == total or (every and self.step % every == 0):
                    self.save()

    # ----------------------------------------------------------------- pieces of a step
    def _next_problems(self, count: int) -> list[Problem]:
        if self._problems is None:
            self._problems = self.task.train_problems(self.config.run.seed, start=self.position)
        problems = [next(self._problems) for _ in range(count)]
        self.position += count
        return problems

    def _context_pairs(
        self, problems: Sequence[Problem], sources: Sequence[Problem], timings: dict[str, float]
    ) -> list[ContextPair]:
        """Student and teacher contexts, the teacher context of ``problems[i]`` showing the
        visual thought of ``sources[i]``; visual thoughts are drawn by the teacher model where
        ``sampling.visual_thoughts`` asks for it (every source, or those without a stored one).

        The SFT control needs no teacher context, and the noise control replaces the VT's pixels,
        so neither draws: a missing VT is then stood in for by the problem image, whose shape the
        noise takes.
        """
        policy = self.config.sampling.visual_thoughts
        missing = [problem for problem in sources if problem.visual_thought is None]
        if policy == "stored" and missing:
            raise ConfigError(
                f"sampling.visual_thoughts: problem {missing[0].id!r} has no stored visual thought (got 'stored'); "
                "use 'auto' to draw the missing ones with the model"
            )
        wanted = [i for i, problem in enumerate(sources) if policy == "generate" or problem.visual_thought is None]
        drawn: dict[int, Any] = {}
        if wanted and (self.phase.sft or self.phase.noise_vt):
            drawn = {i: _stand_in(sources[i]) for i in wanted}
        elif wanted:
            started = time.perf_counter()
            was_training = self.teacher.training
            self.teacher.eval()
            with torch.no_grad(), sharding.gathered(self.teacher):
                images = self.backend.generate_visual_thought(self.teacher, [sources[i] for i in wanted], self.generator)
            self.teacher.train(was_training)
            drawn = dict(zip(wanted, images))
            timings["visual_thought_s"] += time.perf_counter() - started
        return [self.builder.build(problem, drawn.get(i, sources[i].visual_thought)) for i, problem in enumerate(problems)]

    def _teacher_context(self, context: Context) -> Context:
        if self.phase.noise_vt:
            return with_noise_visual_thought(context, self.backend, self.generator)
        return context

    def _fit_forward_cap(self, teachers: Sequence[Context], completions: CompletionBatch) -> CompletionBatch:
        """Cut completions so each teacher sequence (context + completion + close) fits
        ``max_forward_tokens``; the student scores the same cut completion."""
        cap = self.config.sampling.max_forward_tokens
        room = []
        for context in teachers:
            length = self.backend.context_length(context)
            if length + 2 > cap:
                raise ConfigError(
                    f"sampling.max_forward_tokens: a teacher context is {length} positions long, so no "
                    f"completion fits in {cap} (got {cap}); raise it above {length + 1}"
                )
            room.append(cap - length - 1)
        limits = torch.tensor(room, dtype=torch.long, device=completions.lengths.device)
        if bool((completions.lengths <= limits).all()):
            return completions
        return completions.truncated(limits, self.backend.vocabulary.pad_id)

    def _sft_loss(self, students: Sequence[Context], problems: Sequence[Problem], samples_per_step: int) -> torch.Tensor:
        """The SFT control: cross-entropy on each problem's text-only reference trace (its
        reasoning and answer, as the task writes it) + EOS, in the student context. A trace
        longer than ``sampling.max_completion_tokens`` is cut there and trains no EOS."""
        vocabulary = self.backend.vocabulary
        cap = self.config.sampling.max_completion_tokens
        traces, cut = [], []
        for problem in problems:
            if problem.reference_trace is None:
                raise ConfigError(
                    f"experiment.sft_control: problem {problem.id!r} of task {self.config.task.name!r} has no "
                    "reference trace to train on (got true); set it to false or use a task that provides traces"
                )
            encoded = self.backend.encode(problem.reference_trace)
            traces.append(encoded[:cap])
            cut.append(len(encoded) > cap)
        width = max(len(trace) for trace in traces)
        tokens = torch.full((len(traces), width), vocabulary.pad_id, dtype=torch.long, device=self.device)
        for row, trace in enumerate(traces):
            tokens[row, : len(trace)] = torch.tensor(trace, dtype=torch.long)
        lengths = torch.tensor([len(t) for t in traces], dtype=torch.long, device=self.device)
        valid = torch.arange(width, device=self.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, N)
        finished = ~torch.tensor(cut, dtype=torch.bool, device=self.device)
        batch = CompletionBatch(tokens, lengths, valid, finished)
        with self._precision():
            rows = self.backend.completion_logits(self.student, students, batch)
        targets = torch.cat([tokens, torch.full_like(tokens[:, :1], vocabulary.pad_id)], dim=1)  # (B, N+1)
        targets.scatter_(1, lengths.unsqueeze(1), vocabulary.eos_id)
        mask = rows.mask.clone()  # (B, N+1)
        mask[~finished, lengths[~finished]] = False  # a cut trace's next token is not EOS
        per_row = token_cross_entropy(rows.logits, targets)
        return micro_batch_loss(per_row, mask, samples_per_step)

    @staticmethod
    @torch.no_grad()
    def _kl_share(student_rows: CompletionLogits, teacher_rows: CompletionLogits, samples_per_step: int) -> float:
        """This micro-batch's share of the step's mean KL(teacher || student) (a diagnostic)."""
        per_row = kl_divergence(student_rows.logits, teacher_rows.logits, mask=student_rows.mask, reduction="none")
        return float(micro_batch_loss(per_row, student_rows.mask, samples_per_step))

    def _clip_gradients(self) -> float:
        parameters = [p for p in self.student.parameters() if p.grad is not None]
        clip = self.config.optim.grad_clip
        if self.ranks.distributed:
            return sharding.clip_grad_norm(parameters, clip)
        if clip is None:
            norms = [p.grad.detach().norm() for p in parameters]
            return float(torch.stack(norms).norm()) if norms else 0.0
        return float(torch.nn.utils.clip_grad_norm_(parameters, clip))

    def _precision(self):
        return runtime.autocast(self.device, self.config.run.precision)

    # ----------------------------------------------------------------- metrics and checkpoints
    def _log(self, metrics: dict[str, float], always: bool = False) -> None:
        """Every ``train.log_every`` steps, at the last and when ``always``, the step's scalars to
        the loggers, with the step's completion tokens per second (all ranks) and this process's
        peak memory."""
        every = self.config.train.log_every
        due = always or not self.step % every or self.step == self.config.schedule.total_steps
        if not self.ranks.is_main or not due:
            return
        scalars = dict(metrics)
        if "completion_tokens" in scalars and scalars.get("step_s"):
            train = self.config.train
            samples = train.samples_per_step * train.grad_accum
            scalars["tokens_per_s"] = scalars["completion_tokens"] * samples / scalars["step_s"]
        scalars["peak_memory_gb"] = runtime.peak_memory_gb(self.device)
        self.loggers.log_scalars(self.phase.name, self.step, scalars)

    def evaluate_benchmarks(self) -> dict[str, float]:
        """Every ``eval.every`` steps, the student's accuracy on each ``eval.benchmarks`` subset
        (``benchmark/<name>``, and ``benchmark_s``), answered greedily; empty on other steps.
        Every rank answers (sharded weights are gathered); rank 0 logs."""
        every, probe = self.config.eval.every, self.benchmarks
        if probe is None or not every or self.step % every:
            return {}
        with sharding.gathered(self.student), self._precision():
            return probe.run(self.backend, self.student, self.evaluation_sampler)

    def log_media(self) -> None:
        """The media problems' greedy completions by the current student, with the per-token KL
        from the current teacher in the (true) teacher context, to the loggers. Every rank takes
        part (sharded weights are gathered); rank 0 logs."""
        logging = self.config.logging
        problems = list(self.task.eval_problems(logging.media_problems)) if logging.media_problems else []
        if not problems:
            return
        with sharding.gathered(self.student), sharding.gathered(self.teacher), self._precision():
            samples = media_samples(self.backend, self.task, self.student, self.teacher, problems, self.evaluation_sampler)
        if self.ranks.is_main:
            title = f"{self.phase.name}, step {self.step}: student completions, KL(teacher || student) per token"
            self.loggers.log_media(self.phase.name, self.step, samples, render_html(title, samples))

    def _rng_states(self) -> dict[str, Any]:
        states = {
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": [list(part) if isinstance(part, tuple) else part for part in random.getstate()],
        }
        if torch.cuda.is_available():
            states["cuda_rng"] = torch.cuda.get_rng_state_all()
        return states

    def _restore_rng_states(self, state: dict[str, Any]) -> None:
        """This rank's streams as saved; a single-process checkpoint holds rank 0's only, and a
        rank the checkpoint did not have keeps its freshly seeded streams."""
        saved = state.get("rank_rng", [state])
        if self.ranks.rank >= len(saved):
            return
        states = saved[self.ranks.rank]
        self.generator.set_state(states["generator"])
        torch.set_rng_state(states["torch_rng"])
        random.setstate(tuple(tuple(part) if isinstance(part, list) else part for part in states["python_rng"]))
        if "cuda_rng" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda_rng"])

    def _trainer_state(self) -> dict[str, Any] | None:
        """Everything but the weights, on rank 0 (None elsewhere): the step, the data position,
        the schedule, every rank's RNG streams and the optimizer state (with several processes
        its parameter groups only: the moments are saved with the weights, sharded). Every rank
        must call it."""
        rng = self._rng_states()
        every_rank_rng = self.ranks.gather(rng)
        if self.ranks.distributed:
            optimizer = {"optimizer_param_groups": sharded_state.optimizer_param_groups(self.student, self.optimizer)}
        else:
            optimizer = {"optimizer": self.optimizer.state_dict()}
        if not self.ranks.is_main:
            return None
        state = {"step": self.step, "position": self.position, "scheduler": self.scheduler.state_dict(), **rng, **optimizer}
        if self.ranks.distributed:
            state["rank_rng"] = every_rank_rng
        return state

    def release_optimizer(self) -> None:
        """Free the gradients and the optimizer's state (training is over: evaluation needs the
        memory). The last checkpoint keeps them; :meth:`resume` restores them."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        runtime.release_cached_memory(self.device)

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomic) and return its directory.

        A single process writes whole models as the backend saves them (``student/``,
        ``teacher/``); several processes write ``sharded/``, each rank its own shards of the
        models and the optimizer, and nothing is gathered. Every rank must call it.
        """
        state = self._trainer_state()

        def write_weights(directory: Path) -> None:
            if self.ranks.distributed:  # complete models, every rank its own shards
                sharded_state.save_sharded(directory, self.student, self.teacher, self.optimizer)
            elif self.lora is None and not self._frozen:
                self.backend.save_pretrained(self.student, directory / "student")
                self.backend.save_pretrained(self.teacher, directory / "teacher")
            else:
                if self.lora is not None:  # the adapters; the base is the start model's
                    lora.save_adapters(self.student, directory / "student")
                    lora.save_adapters(self.teacher, directory / "teacher")
                    frozen = {name for name, parameter in self.student.named_parameters() if not parameter.requires_grad}
                else:
                    checkpoint.write_trainable(self.student, self._frozen, directory / "student")
                    checkpoint.write_trainable(self.teacher, self._frozen, directory / "teacher")
                    frozen = self._frozen
                if self._start_record is None:  # hashing a large start checkpoint takes a while: once
                    backend_section = self.config.backend.model_dump(mode="json")
                    start = self.backend.start_checkpoint()
                    self._start_record = checkpoint.start_record(start, frozen, backend_section)
                (directory / checkpoint.START_RECORD).write_text(json.dumps(self._start_record, indent=1))

        return checkpoint.save_checkpoint(
            self.checkpoints_dir, self.step, write_weights, state, keep=self.config.train.keep_checkpoints, ranks=self.ranks
        )

    def resume(self) -> bool:
        """Load this phase's newest checkpoint, if any; True when one was loaded. Rank 0 picks
        and verifies it. Any number of processes resumes any checkpoint: a sharded one is read
        shard by shard by every rank; whole models are loaded by rank 0, which gives every rank
        its shards."""
        main = self.ranks.is_main
        if main:
            checkpoint.remove_interrupted_saves(self.checkpoints_dir)
        directory = self.ranks.broadcast(checkpoint.latest_checkpoint(self.checkpoints_dir) if main else None)
        if directory is None:
            if main:  # steps logged by a run killed before its first checkpoint are taken again
                self.metrics.truncate(self.phase.name, 0)
            return False
        state = checkpoint.load_trainer_state(directory, verify=main, mmap=self.ranks.distributed)
        if checkpoint.is_sharded(directory):
            groups = state["optimizer_param_groups"]
            sharded_state.load_sharded(directory, self.student, self.teacher, self.optimizer, groups)
        else:
            partial = (directory / checkpoint.START_RECORD).is_file()
            if partial:  # trainable tensors or adapters: the frozen ones must be the start checkpoint's
                problem = None
                if main:
                    try:
                        checkpoint.check_start(directory, self.backend.start_checkpoint())
                    except CheckpointError as error:
                        problem = str(error)
                problem = self.ranks.broadcast(problem)  # every rank stops, not rank 0 alone
                if problem:
                    raise CheckpointError(problem)
            if self.lora is not None:

                def load(full: torch.nn.Module, name: str) -> None:
                    lora.load_adapters(full, directory / name)
            elif partial:

                def load(full: torch.nn.Module, name: str) -> None:
                    checkpoint.read_trainable(full, self._frozen, directory / name)
            else:

                def load(full: torch.nn.Module, name: str) -> None:
                    self.backend.load_weights(full, directory / name)

            for name, model, skeleton in (
                ("student", self.student, self._student_skeleton),
                ("teacher", self.teacher, self._teacher_skeleton),
            ):
                sharding.load_unsharded(model, skeleton, self.ranks, lambda full, name=name: load(full, name), partial)
            optimizer_state.load_optimizer_state_dict(self.student, self.optimizer, state["optimizer"], self.ranks)
        if self.state_offload is not None:
            self.state_offload.to_host()
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_configured_optimizer()
        self._restore_rng_states(state)
        self.step, self.position = int(state["step"]), int(state["position"])
        self._problems = None
        if main:
            self.metrics.truncate(self.phase.name, self.step)
        return True


    def _apply_configured_optimizer(self) -> None:
        """After loading a checkpoint: the config's peak lr and AdamW settings replace the saved
        ones. They are equal (and the lr the same float) unless the resume changed them with
        ``--allow-changes``, which must then take effect from the next step."""
        optim = self.config.optim
        self.scheduler.base_lrs = [optim.lr for _ in self.optimizer.param_groups]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group.update(lr=optim.lr * factor, initial_lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                         weight_decay=optim.weight_decay)  # fmt: skip


def recompute_layers(backend, model: torch.nn.Module) -> None:
    """``train.activation_checkpointing`` in a one-process run: the backend's
    :meth:`~opsd_core.interfaces.Backend.recomputed_layers` of ``model`` recompute their
    activations in backward (multi-process runs get it from the backend's ``parallelize``)."""
    layers = backend.recomputed_layers(model)
    if not layers:
        raise ConfigError(
            f"train.activation_checkpointing: backend {type(backend).__name__} names no layers to recompute "
            "(got true); set it to false"
        )
    for layer in layers:
        checkpoint_forward(layer)


def _stand_in(problem: Problem) -> Any:
    """The stored visual thought, else the problem image (for controls that never look at it)."""
    return problem.visual_thought if problem.visual_thought is not None else problem.image
