"""Pretraining the shipped tiny-umm checkpoint: ``python -m opsd_tiny.pretrain --out DIR``.

Owns: the "ThinkMorph-like" pretraining recipe (cross-entropy on reference traces, 80 % in
the teacher format with the visual thought, 20 % text-only; canonical tie-break; detour
traces whose off-path move is not trained), the noise-VT fine-tune that teaches the model to
ignore uninformative visual thoughts, and the gate a checkpoint must pass (else the next seed
is tried).
Does not know: OPSD; the result is only a start checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from opsd_core.evaluation import evaluate
from opsd_core.trainer.loss import token_cross_entropy
from opsd_core.trainer.schedule import build_scheduler
from opsd_core.types import CompletionBatch, ImageSegment
from opsd_tiny.backend import TinyBackend
from opsd_tiny.config import TinyBackendParams
from opsd_tiny.task import STEPS, FrozenLakeTask, LakeMap, trace_text
from opsd_tiny.vocab import MOVES

PRETRAIN_STREAM = 1_000_000  # problem seeds of pretraining data, apart from train and eval streams


@dataclass(frozen=True)
class Recipe:
    """Pretraining hyperparameters (measured on 2 CPU cores to pass the gate)."""

    steps: int = 2500
    batch: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup: int = 100
    teacher_fraction: float = 0.8
    detour_probability: float = 0.5
    finetune_steps: int = 150
    finetune_lr: float = 1e-4
    finetune_warmup: int = 10
    finetune_noise_fraction: float = 0.5
    grad_clip: float = 1.0


@dataclass(frozen=True)
class Gate:
    """What a checkpoint must reach on the fixed evaluation set (greedy)."""

    min_teacher: float = 0.95
    min_gap: float = 0.15
    min_student: float = 0.65

    def passes(self, student: float, teacher: float) -> bool:
        return teacher >= self.min_teacher and student <= teacher - self.min_gap and student >= self.min_student


def detour_trace(lake: LakeMap, rng: np.random.Generator, probability: float) -> tuple[list, int | None]:
    """A reference path, with probability ``probability`` one random off-path move followed by
    the canonical path from where it lands; returns (path, index of the detour move or None)."""
    path = lake.canonical_path()
    if rng.random() >= probability:
        return path, None
    index = int(rng.integers(len(path)))
    here = lake.start if index == 0 else path[index - 1][1]
    options = []
    for move in MOVES:
        step = STEPS[move]
        target = (here[0] + step[0], here[1] + step[1])
        if move != path[index][0] and lake.free(target) and target != lake.goal:
            options.append((move, target))
    if not options:
        return path, None
    move, landed = options[int(rng.integers(len(options)))]
    return path[:index] + [(move, landed)] + lake.canonical_path(landed), index


def training_batch(backend: TinyBackend, task: FrozenLakeTask, rng: np.random.Generator, recipe: Recipe,
                   start: int, noise_fraction: float):
    """Contexts, completions (detour moves marked not-sampled, so they carry no loss) and
    int64 (B, N + 1) targets for ``recipe.batch`` fresh problems."""
    builder = backend.context_builder()
    contexts, traces, detours = [], [], []
    for offset in range(recipe.batch):
        problem = task.problem(PRETRAIN_STREAM + int(rng.integers(1 << 30)), start + offset)
        lake = problem.metadata["map"]
        path, detour = detour_trace(lake, rng, recipe.detour_probability)
        if rng.random() < recipe.teacher_fraction:
            context = builder.build(problem).teacher
            if rng.random() < noise_fraction:
                thought = context.get("visual_thought")
                noise = torch.from_numpy(rng.standard_normal(tuple(thought.image.shape)).astype(np.float32))
                context = context.with_segment(ImageSegment(thought.name, thought.image, pixels=noise))
        else:
            context = builder.student_context(problem)
        contexts.append(context)
        traces.append(backend.encode(trace_text(lake, path)))
        detours.append(detour)
    width = max(len(trace) for trace in traces)
    tokens = torch.full((len(traces), width), backend.vocabulary.pad_id, dtype=torch.long)
    sampled = torch.zeros(len(traces), width, dtype=torch.bool)
    for row, (trace, detour) in enumerate(zip(traces, detours)):
        tokens[row, : len(trace)] = torch.tensor(trace)
        sampled[row, : len(trace)] = True
        if detour is not None:
            sampled[row, 2 * detour] = False
    lengths = torch.tensor([len(trace) for trace in traces])
    batch = CompletionBatch(tokens, lengths, sampled, torch.ones(len(traces), dtype=torch.bool))
    targets = torch.cat([tokens, torch.zeros_like(tokens[:, :1])], dim=1)  # (B, N+1)
    targets.scatter_(1, lengths.unsqueeze(1), backend.vocabulary.eos_id)
    return contexts, batch, targets


def train_phase(model, backend, task, rng, recipe: Recipe, steps: int, lr: float, warmup: int, noise_fraction: float,
                label: str, first_problem: int) -> int:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    scheduler = build_scheduler(optimizer, warmup, steps, lr, 0.0)
    model.train()
    position = first_problem
    with tqdm(range(steps), desc=label, dynamic_ncols=True) as bar:
        for _ in bar:
            contexts, batch, targets = training_batch(backend, task, rng, recipe, position, noise_fraction)
            position += recipe.batch
            rows = backend.completion_logits(model, contexts, batch)
            per_row = token_cross_entropy(rows.logits, targets)
            loss = (per_row * rows.mask).sum() / rows.mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{float(loss):.4f}")
    return position


def pretrain_seed(seed: int, recipe: Recipe, eval_limit: int | None) -> tuple[torch.nn.Module, TinyBackend, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    backend = TinyBackend(TinyBackendParams(checkpoint="random"))
    task = FrozenLakeTask()
    model = backend.build_model()
    started = time.perf_counter()
    position = train_phase(model, backend, task, rng, recipe, recipe.steps, recipe.lr, recipe.warmup, 0.0,
                           f"pretrain seed {seed}", 0)
    train_phase(model, backend, task, rng, recipe, recipe.finetune_steps, recipe.finetune_lr, recipe.finetune_warmup,
                recipe.finetune_noise_fraction, f"noise fine-tune seed {seed}", position)
    wall = time.perf_counter() - started
    model.eval()
    results = evaluate(backend, model, task, task.eval_problems(eval_limit), ("student", "teacher", "noise"),
                       batch_size=500, max_tokens=24, seed=seed)
    figures = {mode: result.accuracy for mode, result in results.items()}
    return model, backend, {"seed": seed, "train_wall_s": round(wall, 1), "accuracy": figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opsd_tiny.pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="Checkpoint directory to write.")
    parser.add_argument("--seed", type=int, default=0, help="First seed to try.")
    parser.add_argument("--max-seeds", type=int, default=5, help="Seeds to try before giving up.")
    parser.add_argument("--steps", type=int, default=Recipe.steps, help="Pretraining steps.")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads.")
    parser.add_argument("--eval-limit", type=int, default=None, help="Evaluate on fewer problems (quick checks).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(steps=args.steps)
    gate = Gate()
    for seed in range(args.seed, args.seed + args.max_seeds):
        model, backend, report = pretrain_seed(seed, recipe, args.eval_limit)
        accuracy = report["accuracy"]
        passed = gate.passes(accuracy["student"], accuracy["teacher"])
        print(json.dumps({**report, "gate_passed": passed}), flush=True)
        if passed:
            temporary = args.out.with_name(args.out.name + ".tmp")
            shutil.rmtree(temporary, ignore_errors=True)
            metadata = {"pretraining": {"recipe": asdict(recipe), "gate": asdict(gate), **report,
                                        "command": "python -m opsd_tiny.pretrain " + " ".join(argv or sys.argv[1:])}}
            backend.save_pretrained(model, temporary, metadata)
            if args.out.exists():
                shutil.rmtree(args.out)
            os.replace(temporary, args.out)
            print(f"wrote {args.out}", flush=True)
            return 0
    print(f"no seed in {args.seed}..{args.seed + args.max_seeds - 1} passed the gate {asdict(gate)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
