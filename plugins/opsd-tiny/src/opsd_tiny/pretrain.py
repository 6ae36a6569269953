"""Pretraining the shipped tiny-umm checkpoint: ``python -m opsd_tiny.pretrain --out DIR``.

Owns: the "ThinkMorph-like" recipe of the CPU study (recipe B: cross-entropy on reference
traces, 80 % in the teacher format with the visual thought and 20 % text-only, canonical
tie-break, detour traces whose off-path move is not trained; then fine-tune E, where half the
visual thoughts are N(0, 1) noise with the target unchanged, so the model learns to ignore an
uninformative visual thought), its own greedy evaluation and KL measurement, the gate a
checkpoint must pass (else the next seed is tried), and writing the checkpoint with its
provenance.
Does not know: OPSD, or the core's trainer, sampler and evaluation; the result is a start
checkpoint and this module drives the model only through :class:`TinyBackend`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from opsd_core.api import VISUAL_THOUGHT, CompletionBatch, Context, ImageSegment, Problem
from opsd_tiny.backend import TinyBackend
from opsd_tiny.config import RANDOM_WEIGHTS, FrozenLakeParams, TinyBackendParams
from opsd_tiny.task import FrozenLakeTask, LakeMap, detour_path, trace_text

COMMAND = "python -m opsd_tiny.pretrain"
MAX_COMPLETION = 24  # the longest reference trace is 10 moves = 20 tokens; room to wander
EVAL_BATCH = 500
CURVE_EVERY, CURVE_PROBLEMS = 250, 200
KL_PROBLEMS = 256


@dataclass(frozen=True)
class Recipe:
    """Recipe B then fine-tune E of the CPU study (``reference/embedded-default-study.md``)."""

    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    teacher_fraction: float = 0.8
    finetune_steps: int = 150
    finetune_lr: float = 1e-4
    finetune_warmup: int = 10
    finetune_noise_fraction: float = 0.5


@dataclass(frozen=True)
class Phase:
    """One optimizer run of the recipe: its steps, peak lr, warm-up and noise-VT fraction."""

    name: str
    steps: int
    lr: float
    warmup: int
    noise_fraction: float


@dataclass(frozen=True)
class Gate:
    """What a checkpoint must reach on the fixed evaluation set, greedy: a VT-reading teacher
    context, a student past the planning "click" (OPSD only helps there) with a clear gap."""

    min_teacher: float = 0.95
    min_gap: float = 0.15
    min_student: float = 0.65

    def failures(self, student: float, teacher: float) -> list[str]:
        checks = [
            (teacher >= self.min_teacher, f"teacher {teacher:.3f} < {self.min_teacher}"),
            (student <= teacher - self.min_gap, f"student {student:.3f} > teacher - {self.min_gap}"),
            (student >= self.min_student, f"student {student:.3f} < {self.min_student}"),
        ]
        return [message for passed, message in checks if not passed]


# ---------------------------------------------------------------------------- data
def with_noise_thought(context: Context, noise: torch.Tensor) -> Context:
    """``context`` whose visual thought is float32 (3, H, W) ``noise`` in normalised pixel space."""
    thought = context.get(VISUAL_THOUGHT)
    return context.with_segment(ImageSegment(thought.name, thought.image, pixels=noise))


def training_batch(
    backend: TinyBackend,
    task: FrozenLakeTask,
    problems: Sequence[Problem],
    rng: np.random.Generator,
    recipe: Recipe,
    noise_fraction: float,
) -> tuple[list[Context], CompletionBatch, torch.Tensor]:
    """Contexts, reference completions and int64 (B, N + 1) targets (token i, then EOS).

    A detour move is marked not sampled, so ``row_mask`` gives it no loss while its cell
    token and the recovery are trained.
    """
    builder = backend.context_builder()
    side = backend.config.image_side
    teacher_rows = set(rng.permutation(len(problems))[: round(recipe.teacher_fraction * len(problems))].tolist())
    contexts, traces, detours = [], [], []
    for row, problem in enumerate(problems):
        lake = LakeMap.from_rows(problem.metadata["map"])
        path, detour = detour_path(lake, rng, task.params.detour_probability)
        if row in teacher_rows:
            context = builder.build(problem).teacher
            if rng.random() < noise_fraction:
                noise = torch.from_numpy(rng.standard_normal((3, side, side), dtype=np.float32))
                context = with_noise_thought(context, noise)
        else:
            context = builder.student_context(problem)
        contexts.append(context)
        traces.append(backend.encode(trace_text(lake, path)))
        detours.append(detour)
    lengths = torch.tensor([len(trace) for trace in traces])
    tokens = torch.full((len(traces), int(lengths.max())), backend.vocabulary.pad_id, dtype=torch.long)
    sampled = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, (trace, detour) in enumerate(zip(traces, detours)):
        tokens[row, : len(trace)] = torch.tensor(trace)
        sampled[row, : len(trace)] = True
        if detour is not None:
            sampled[row, 2 * detour] = False  # token 2k is move k; its cell token stays trained
    completions = CompletionBatch(tokens, lengths, sampled, torch.ones(len(traces), dtype=torch.bool))
    targets = torch.cat([tokens, torch.full_like(tokens[:, :1], backend.vocabulary.pad_id)], dim=1)  # (B, N+1)
    targets.scatter_(1, lengths.unsqueeze(1), backend.vocabulary.eos_id)
    return contexts, completions, targets


# ---------------------------------------------------------------------------- model runs
@torch.no_grad()
def sample_completions(
    backend: TinyBackend,
    model: torch.nn.Module,
    contexts: Sequence[Context],
    temperature: float,
    generator: torch.Generator | None = None,
) -> CompletionBatch:
    """One completion per context, greedy when ``temperature`` is 0, capped at MAX_COMPLETION."""
    vocabulary = backend.vocabulary
    state = backend.start_decoding(model, contexts, MAX_COMPLETION)
    batch = len(contexts)
    tokens = torch.full((batch, MAX_COMPLETION), vocabulary.pad_id, dtype=torch.long)
    lengths = torch.zeros(batch, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    logits = state.logits
    for column in range(MAX_COMPLETION):
        if temperature == 0:
            chosen = logits.float().argmax(dim=-1).cpu()
        else:
            probabilities = torch.softmax(logits.float().cpu() / temperature, dim=-1)
            chosen = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
        writing = ~finished & (chosen != vocabulary.eos_id)
        finished |= chosen == vocabulary.eos_id
        tokens[writing, column] = chosen[writing]
        lengths += writing.long()
        if not bool(writing.any()) or column + 1 == MAX_COMPLETION:
            break
        logits = backend.decode_step(state, torch.where(writing, chosen, vocabulary.pad_id))
    width = int(lengths.max())
    sampled = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)  # (B, N)
    return CompletionBatch(tokens[:, :width], lengths, sampled, finished)


def contexts_of(backend: TinyBackend, problems: Sequence[Problem], context: str, seed: int) -> list[Context]:
    """``student``, ``teacher`` or ``noise`` (teacher with an N(0, 1) visual thought) contexts."""
    builder = backend.context_builder()
    if context == "student":
        return [builder.student_context(problem) for problem in problems]
    contexts = [builder.build(problem).teacher for problem in problems]
    if context == "noise":
        generator = torch.Generator().manual_seed(seed)
        side = backend.config.image_side
        contexts = [with_noise_thought(c, torch.randn(3, side, side, generator=generator)) for c in contexts]
    return contexts


def greedy_accuracy(
    backend: TinyBackend, task: FrozenLakeTask, model: torch.nn.Module, problems: Sequence[Problem], context: str
) -> float:
    """Fraction of ``problems`` whose greedy completion in the ``context`` context scores correct."""
    correct = 0
    for start in range(0, len(problems), EVAL_BATCH):
        chunk = problems[start : start + EVAL_BATCH]
        completions = sample_completions(backend, model, contexts_of(backend, chunk, context, seed=start), 0.0)
        for problem, tokens in zip(chunk, completions.token_lists()):
            correct += task.score(problem, backend.decode(tokens)).correct
    return correct / len(problems)


@torch.no_grad()
def kl_teacher_student(
    backend: TinyBackend, model: torch.nn.Module, problems: Sequence[Problem], noise: bool, seed: int = 0
) -> float:
    """KL(p(.|teacher context) || p(.|student context)) in nats, averaged over the aligned
    completion rows (EOS row included) of completions sampled at T = 1 in the student context."""
    generator = torch.Generator().manual_seed(seed)
    students = contexts_of(backend, problems, "student", seed)
    teachers = contexts_of(backend, problems, "noise" if noise else "teacher", seed)
    completions = sample_completions(backend, model, students, 1.0, generator)
    teacher_log = torch.log_softmax(backend.completion_logits(model, teachers, completions).logits.float(), dim=-1)
    rows = backend.completion_logits(model, students, completions)
    student_log = torch.log_softmax(rows.logits.float(), dim=-1)
    per_row = (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)  # (B, N+1)
    return float(per_row[rows.mask].mean())


# ---------------------------------------------------------------------------- training
def warmup_cosine(warmup: int, total: int):
    """Learning-rate factor per step: linear warm-up to 1, then cosine to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def train_phase(
    model: torch.nn.Module,
    backend: TinyBackend,
    task: FrozenLakeTask,
    rng: np.random.Generator,
    recipe: Recipe,
    phase: Phase,
    seed: int,
    first_problem: int,
    curve: list[dict],
) -> int:
    """Run ``phase`` on fresh pretraining problems from index ``first_problem``, appending
    probe accuracies to ``curve``; returns the next unused problem index."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(phase.warmup, phase.steps))
    probe = task.eval_problems(CURVE_PROBLEMS)
    index = first_problem
    model.train()
    with tqdm(range(1, phase.steps + 1), desc=f"seed {seed} {phase.name}", dynamic_ncols=True) as bar:
        for step in bar:
            problems = [task.problem(seed, index + row, "pretrain") for row in range(recipe.batch)]
            index += recipe.batch
            contexts, completions, targets = training_batch(backend, task, problems, rng, recipe, phase.noise_fraction)
            rows = backend.completion_logits(model, contexts, completions)
            targets = targets.to(rows.logits.device)
            losses = F.cross_entropy(rows.logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B*(N+1),)
            loss = losses[rows.mask.flatten()].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % CURVE_EVERY == 0 or step == phase.steps:
                model.eval()
                point = {"phase": phase.name, "step": step, "loss": round(loss.item(), 4)}
                for context in ("student", "teacher"):
                    point[context] = greedy_accuracy(backend, task, model, probe, context)
                model.train()
                curve.append(point)
                bar.write(json.dumps(point))
    return index


def pretrain_seed(
    seed: int, recipe: Recipe, task: FrozenLakeTask, eval_size: int, device: str
) -> tuple[TinyBackend, torch.nn.Module, dict]:
    """Train recipe B then fine-tune E from seed ``seed``; evaluate on ``eval_size`` problems."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    backend = TinyBackend(TinyBackendParams(checkpoint=RANDOM_WEIGHTS)).place(device)
    model = backend.build_model()
    curve: list[dict] = []
    phases = (
        Phase("pretrain", recipe.steps, recipe.lr, recipe.warmup, 0.0),
        Phase(
            "noise fine-tune",
            recipe.finetune_steps,
            recipe.finetune_lr,
            recipe.finetune_warmup,
            recipe.finetune_noise_fraction,
        ),
    )
    index = 0
    for phase in phases:
        index = train_phase(model, backend, task, rng, recipe, phase, seed, index, curve)
    train_wall = time.perf_counter() - started
    model.eval()
    problems = task.eval_problems(eval_size)
    figures = {context: greedy_accuracy(backend, task, model, problems, context) for context in ("student", "teacher", "noise")}
    kl_problems = problems[:KL_PROBLEMS]
    figures["kl"] = round(kl_teacher_student(backend, model, kl_problems, noise=False), 4)
    figures["kl_noise"] = round(kl_teacher_student(backend, model, kl_problems, noise=True), 4)
    report = {
        "seed": seed,
        "eval_problems": len(problems),
        "accuracy": {context: figures[context] for context in ("student", "teacher", "noise")},
        "kl": figures["kl"],
        "kl_noise": figures["kl_noise"],
        "train_wall_s": round(train_wall, 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "curve": curve,
    }
    return backend, model, report


def device_description(device: str) -> str:
    """``device`` with the hardware's name, for the checkpoint's provenance."""
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs)"


def write_atomically(backend: TinyBackend, model: torch.nn.Module, out: Path, metadata: dict) -> None:
    """Write the checkpoint beside ``out`` and rename it into place, so ``out`` is never partial."""
    temporary = out.with_name(out.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    backend.save_pretrained(model, temporary, metadata)
    if out.exists():
        shutil.rmtree(out)
    os.replace(temporary, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Pretrain a tiny-umm checkpoint that passes the gate.")
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="first seed to try (default 0)")
    parser.add_argument(
        "--max-seeds", type=int, default=32, help="seeds to try before giving up (default 32; about 1 in 24 passed)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    parser.add_argument("--steps", type=int, default=Recipe.steps, help="recipe-B steps (the shipped recipe: 1500)")
    parser.add_argument("--eval-size", type=int, default=1000, help="gate problems (the shipped gate: 1000)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe, gate = Recipe(steps=args.steps), Gate()
    task = FrozenLakeTask(FrozenLakeParams())
    started = time.perf_counter()
    for seed in range(args.seed, args.seed + args.max_seeds):
        backend, model, report = pretrain_seed(seed, recipe, task, args.eval_size, args.device)
        accuracy = report["accuracy"]
        failures = gate.failures(accuracy["student"], accuracy["teacher"])
        print(
            json.dumps({key: value for key, value in report.items() if key != "curve"} | {"gate": failures or "passed"})
        )
        if failures:
            continue
        command = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
        metadata = {
            "pretraining": {
                "command": command,
                "recipe": asdict(recipe),
                "task": task.params.model_dump(),
                "gate": asdict(gate),
                "seeds_tried": list(range(args.seed, seed + 1)),
                "torch": torch.__version__,
                "device": device_description(args.device),
                "threads": args.threads,
                **report,
            }
        }
        write_atomically(backend, model, args.out, metadata)
        print(
            f"\nseed {seed} passed the gate on {report['eval_problems']} problems: student {accuracy['student']:.3f}, "
            f"teacher {accuracy['teacher']:.3f}, noise-VT teacher {accuracy['noise']:.3f}; KL(teacher || student) "
            f"{report['kl']:.3f} nats/token (noise VT {report['kl_noise']:.3f}); this seed {report['wall_s']:.0f} s, "
            f"all seeds {time.perf_counter() - started:.0f} s. Wrote {args.out}"
        )
        return 0
    print(f"no seed in {args.seed}..{args.seed + args.max_seeds - 1} passed the gate {asdict(gate)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
