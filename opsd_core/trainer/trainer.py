"""The Visual-OPSD training loop.

Owns: one optimizer step, read top to bottom: sample on-policy in the student context ->
teacher forward in the privileged context under no_grad -> student forward -> divergence ->
backward; then clipping, AdamW, the schedule and the teacher update. Also the noise and SFT
controls (flags of the same loop), metrics lines and resumable checkpoints (of the adapters
alone when ``[backend.lora]`` puts LoRA adapters on the student, see ``opsd_core.lora``). In a
multi-process run every rank runs this same loop on its share of each step's problems, with the student and
teacher sharded by the backend (``opsd_core.runtime`` holds what the ranks exchange, ``sharding.py`` the sharded models).
Does not know: any model, task or divergence; everything goes through the role interfaces.
"""

from __future__ import annotations

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
from opsd_core.config import lora_settings
from opsd_core.contexts.noise import with_noise_visual_thought
from opsd_core.divergences import kl_divergence
from opsd_core.errors import ConfigError, NonFiniteError
from opsd_core.rundir import MetricsLog
from opsd_core.sampling import sample_seed
from opsd_core.trainer import checkpoint, optimizer_state, sharding
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
class Mode:
    """What a training phase optimises.

    Attributes:
        name: the phase name in metrics and directories (``opsd``, ``noise``, ``sft``).
        noise_vt: the teacher sees N(0, 1) noise instead of the visual thought.
        sft: cross-entropy on reference answers instead of distillation.
    """

    name: str
    noise_vt: bool = False
    sft: bool = False


class Trainer:
    """Trains ``student`` with OPSD (or a control) and writes metrics and checkpoints.

    Args:
        components: the run's roles, built and checked by
            :func:`~opsd_core.components.build_components` (its config is the resolved run config).
        student: the model to train (its weights are updated in place; with ``[backend.lora]``
            its adapters are added to it here and its other parameters frozen).
        phase_dir: where this phase writes ``checkpoints/``.
        metrics: the run's metric lines (shared by phases; lines carry the phase).
        mode: OPSD, or the noise or SFT control.
        ranks: this process among the training processes (default: a single process). With
            more than one, ``student`` and its teacher are sharded by ``backend.parallelize``.
        skeleton: with several processes, the weightless unsharded model of an already sharded
            ``student`` (see :func:`~opsd_core.trainer.sharding.build_start`); the teacher is
            then cloned from the student's shards. None: ``student`` is whole and is sharded here.
    """

    def __init__(
        self,
        components: Components,
        student: torch.nn.Module,
        phase_dir: Path,
        metrics: MetricsLog,
        mode: Mode = Mode("opsd"),
        ranks: runtime.Ranks | None = None,
        skeleton: torch.nn.Module | None = None,
    ):
        config = components.config
        self.config, self.backend, self.task = config, components.backend, components.task
        self.divergence, self.teacher_update, self.mode = components.divergence, components.teacher_update, mode
        self.builder, self.sampler = components.context, components.sampler
        # Decided once: a divergence on hidden states never sees the (B, T, V) logits.
        self.hidden_states = components.divergence.uses_hidden_states
        backend, teacher_update = self.backend, self.teacher_update
        self.ranks = ranks or runtime.Ranks()
        self.ranks.share(config.train.samples_per_step, "train.samples_per_step")  # fail now, not at step 1
        self.device = next(student.parameters()).device
        # [backend.lora]: the student trains adapters only; the teacher copies them and shares
        # the frozen base weights; checkpoints hold the adapters.
        self.lora = lora_settings(config)
        if self.lora is not None:
            lora.check_adapters(student, self.lora, direct_weight_reads(components))
            lora.attach_adapters(student, self.lora, seed=config.run.seed)
        if self.ranks.distributed and skeleton is not None:
            # Already sharded: the teacher is made from the student's shards, never whole.
            self.student, self._student_skeleton = student, skeleton
            self._teacher_skeleton = teacher_update.create(skeleton)
            self.teacher = sharding.sharded_clone(student, self._teacher_skeleton, backend, self.ranks, config)
        else:
            teacher = teacher_update.create(student)
            self.student, self._student_skeleton = sharding.shard(backend, student, self.ranks, config)
            self.teacher, self._teacher_skeleton = sharding.shard(backend, teacher, self.ranks, config)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in self.student.parameters() if p.requires_grad],
            lr=optim.lr,
            betas=optim.betas,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        )
        schedule = config.schedule
        self.scheduler = build_scheduler(
            self.optimizer, schedule.warmup_steps, schedule.total_steps, optim.lr, schedule.min_lr
        )
        # Rank 0 draws the single-process stream; other ranks draw their own.
        self.generator = torch.Generator(device=self.device).manual_seed(config.run.seed + self.ranks.rank)
        self.checkpoints_dir = phase_dir / "checkpoints"
        self.metrics = metrics
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
        whole_step = self.config.sampling.whole_step and not self.mode.sft and train.grad_accum > 1
        prepared = [self._prepare_micro_batch(timings) for _ in range(train.grad_accum)] if whole_step else []
        drawn = self._sample_together(prepared, timings) if whole_step else []
        for index in range(train.grad_accum):
            if whole_step:
                problems, students, teachers, seeds = prepared[index]
                completions = drawn[index]
            else:
                problems, students, teachers, seeds = self._prepare_micro_batch(timings)
            if self.mode.sft:
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
        lr = self.scheduler.get_last_lr()[0]
        metrics = {"loss": loss_total, "grad_norm": grad_norm, "lr": lr}
        if not self.mode.sft:
            metrics["kl"] = kl_total
            metrics["completion_tokens"] = tokens / samples_per_step
            metrics["finished"] = finished / samples_per_step
        # Averaged before the update, so every rank takes the same decision on a non-finite step.
        metrics = self.ranks.mean(metrics | timings, skip=("grad_norm", "lr"))
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if finite:
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
                {"phase": self.mode.name, "step": step, "event": "non-finite", "action": action,
                 "loss_value": repr(metrics["loss"]), "grad_norm_value": repr(metrics["grad_norm"])}
            )  # fmt: skip
        self.optimizer.zero_grad(set_to_none=True)
        if action == "stop":
            raise NonFiniteError(
                f"phase {self.mode.name!r}, step {step}: loss {metrics['loss']!r}, gradient norm "
                f"{metrics['grad_norm']!r}; the run stopped before applying it (its last checkpoint is kept). "
                "Lower optim.lr or raise optim.eps, or set train.on_non_finite = 'skip' to drop such steps"
            )

    def _prepare_micro_batch(self, timings: dict[str, float]):
        """This rank's problems of the next micro-batch with their student and teacher contexts
        (visual thoughts drawn, the noise control's noise in place) and sampling seeds.

        A problem's seed is keyed by its position in the problem stream, so its completion is
        the same whichever rank samples it, in whichever batch (the sampler's draws depend only
        on a row's seed): runs on any number of processes, with or without whole-step sampling,
        sample the same completions.
        """
        first = self.position
        everyone = self._next_problems(self.config.train.samples_per_step)
        problems = self.ranks.local_slice(everyone)
        seeds = self.ranks.local_slice([sample_seed(self.config.run.seed, first + i) for i in range(len(everyone))])
        pairs = self._context_pairs(problems, timings)
        students = [pair.student for pair in pairs]
        teachers = None if self.mode.sft else [self._teacher_context(pair.teacher) for pair in pairs]
        return problems, students, teachers, seeds

    def _sample_together(self, micro_batches, timings: dict[str, float]) -> list[CompletionBatch]:
        """On-policy completions of the student contexts of ``micro_batches``, decoded as one
        batch (with the weights gathered once), cut to the forward cap and split back per
        micro-batch."""
        started = time.perf_counter()
        contexts = [context for _, students, _, _ in micro_batches for context in students]
        seeds = [seed for *_, part in micro_batches for seed in part]
        self.student.eval()
        with sharding.gathered(self.student):
            completions = self.sampler.sample(self.student, contexts, seeds=seeds)
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
        bar = tqdm(total=total, initial=self.step, desc=self.mode.name, disable=not shown_here, dynamic_ncols=True)
        with bar:
            while self.step < total:
                started = time.perf_counter()
                metrics = self.train_step()
                metrics["step_s"] = time.perf_counter() - started
                self._log(metrics)
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

    def _context_pairs(self, problems: Sequence[Problem], timings: dict[str, float]) -> list[ContextPair]:
        """Student and teacher contexts; visual thoughts are drawn by the teacher model where
        ``sampling.visual_thoughts`` asks for it (every problem, or those without a stored one).

        The SFT control needs no teacher context, and the noise control replaces the VT's pixels,
        so neither draws: a missing VT is then stood in for by the problem image, whose shape the
        noise takes.
        """
        policy = self.config.sampling.visual_thoughts
        missing = [problem for problem in problems if problem.visual_thought is None]
        if policy == "stored" and missing:
            raise ConfigError(
                f"sampling.visual_thoughts: problem {missing[0].id!r} has no stored visual thought (got 'stored'); "
                "use 'auto' to draw the missing ones with the model"
            )
        wanted = [i for i, problem in enumerate(problems) if policy == "generate" or problem.visual_thought is None]
        drawn: dict[int, Any] = {}
        if wanted and (self.mode.sft or self.mode.noise_vt):
            drawn = {i: _stand_in(problems[i]) for i in wanted}
        elif wanted:
            started = time.perf_counter()
            was_training = self.teacher.training
            self.teacher.eval()
            with torch.no_grad(), sharding.gathered(self.teacher):
                images = self.backend.generate_visual_thought(self.teacher, [problems[i] for i in wanted], self.generator)
            self.teacher.train(was_training)
            drawn = dict(zip(wanted, images))
            timings["visual_thought_s"] += time.perf_counter() - started
        return [self.builder.build(problem, drawn.get(i)) for i, problem in enumerate(problems)]

    def _teacher_context(self, context: Context) -> Context:
        if self.mode.noise_vt:
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
        """The SFT control: cross-entropy on each problem's reference answer + EOS."""
        vocabulary = self.backend.vocabulary
        answers = []
        for problem in problems:
            if problem.reference_answer is None:
                raise ConfigError(f"train.sft: problem {problem.id!r} has no reference answer (got sft = true)")
            answers.append(self.backend.encode(problem.reference_answer)[: self.config.sampling.max_completion_tokens])
        width = max(len(answer) for answer in answers)
        tokens = torch.full((len(answers), width), vocabulary.pad_id, dtype=torch.long, device=self.device)
        for row, answer in enumerate(answers):
            tokens[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
        lengths = torch.tensor([len(a) for a in answers], dtype=torch.long, device=self.device)
        valid = torch.arange(width, device=self.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, N)
        batch = CompletionBatch(tokens, lengths, valid, torch.ones_like(lengths, dtype=torch.bool))
        with self._precision():
            rows = self.backend.completion_logits(self.student, students, batch)
        targets = torch.cat([tokens, torch.full_like(tokens[:, :1], vocabulary.pad_id)], dim=1)  # (B, N+1)
        targets.scatter_(1, lengths.unsqueeze(1), vocabulary.eos_id)
        per_row = token_cross_entropy(rows.logits, targets)
        return micro_batch_loss(per_row, rows.mask, samples_per_step)

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
    def _log(self, metrics: dict[str, float]) -> None:
        every = self.config.train.log_every
        if not self.ranks.is_main or (self.step % every and self.step != self.config.schedule.total_steps):
            return
        self.metrics.append({"phase": self.mode.name, "step": self.step} | {k: round(float(v), 8) for k, v in metrics.items()})

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
        """Everything but the weights, on rank 0 (None elsewhere); every rank must call it."""
        rng = self._rng_states()
        every_rank_rng = self.ranks.gather(rng)
        optimizer = optimizer_state.optimizer_state_dict(self.student, self.optimizer, self.ranks)
        if not self.ranks.is_main:
            return None
        state = {
            "step": self.step,
            "position": self.position,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            **rng,
        }
        if self.ranks.distributed:
            state["rank_rng"] = every_rank_rng
        return state

    def release_optimizer(self) -> None:
        """Free the gradients and the optimizer's state (training is over: evaluation needs the
        memory). The last checkpoint keeps them; :meth:`resume` restores them."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        runtime.release_cached_memory(self.device)

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (atomic) and return its directory.

        Every rank takes part; rank 0 writes full weights (the layout of a single-process run)
        and the other ranks return None once it is written.
        """
        state = self._trainer_state()
        student = sharding.unsharded_copy(self.student, self._student_skeleton, self.ranks)
        teacher = sharding.unsharded_copy(self.teacher, self._teacher_skeleton, self.ranks)
        path = None
        if self.ranks.is_main:

            def write_weights(directory: Path) -> None:
                write = lora.save_adapters if self.lora is not None else self.backend.save_pretrained
                write(student, directory / "student")
                write(teacher, directory / "teacher")

            path = checkpoint.save_checkpoint(
                self.checkpoints_dir, self.step, write_weights, state, keep=self.config.train.keep_checkpoints
            )
        self.ranks.barrier()
        return path

    def resume(self) -> bool:
        """Load this phase's newest checkpoint, if any; True when one was loaded. Rank 0 picks
        and verifies it; the other ranks take their shards from rank 0."""
        main = self.ranks.is_main
        if main:
            checkpoint.remove_interrupted_saves(self.checkpoints_dir)
        directory = self.ranks.broadcast(checkpoint.latest_checkpoint(self.checkpoints_dir) if main else None)
        if directory is None:
            if main:  # steps logged by a run killed before its first checkpoint are taken again
                self.metrics.truncate(self.mode.name, 0)
            return False
        state = checkpoint.load_trainer_state(directory, verify=main, mmap=self.ranks.distributed)
        load = lora.load_adapters if self.lora is not None else self.backend.load_weights
        sharding.load_unsharded(
            self.student, self._student_skeleton, self.ranks, lambda full: load(full, directory / "student")
        )
        sharding.load_unsharded(
            self.teacher, self._teacher_skeleton, self.ranks, lambda full: load(full, directory / "teacher")
        )
        optimizer_state.load_optimizer_state_dict(self.student, self.optimizer, state["optimizer"], self.ranks)
        self.scheduler.load_state_dict(state["scheduler"])
        self._restore_rng_states(state)
        self.step, self.position = int(state["step"]), int(state["position"])
        self._problems = None
        if main:
            self.metrics.truncate(self.mode.name, self.step)
        return True


def _stand_in(problem: Problem) -> Any:
    """The stored visual thought, else the problem image (for controls that never look at it)."""
    return problem.visual_thought if problem.visual_thought is not None else problem.image
