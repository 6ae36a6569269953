"""One full OPSD micro-step on one GPU, ours against the paper code's structure, phase by phase.

The micro-step: sample 16 on-policy completions of up to 512 tokens from the student, run the
teacher over the privileged contexts, and run the student forward and backward through the
loss. Both sides use the full-size ThinkMorph architecture with random weights (``7b-random``,
bf16), the same weights and the same 16 problems of the synthetic ThinkMorph dataset
(``opsd_thinkmorph.demo_data``, written on the fly). Its rows ship a stored visual thought, so
the teacher contexts hold one and none is drawn: visual-thought drawing is not part of the
timed step.

* ``ours``: :meth:`Trainer.train_step` itself, on ``examples/thinkmorph.toml`` with 16 samples
  per optimizer step split into micro-batches of ``--micro-batch`` (1 by default: a student
  forward + backward without activation checkpointing keeps about 10 MB of activations per
  token, so one sample of ~2k positions at a time, as each of the paper's ranks does).
  ``sampling.whole_step`` decodes the 16 completions as one batch with
  :class:`~opsd_core.sampling.BatchedSampler` (temperature 1, CUDA-graph replayed steps); then,
  per micro-batch, the teacher forward under no_grad and the student forward + loss + backward.
  The trainer's phase timers read the host clock without waiting for the GPU, so while ours is
  timed that clock first synchronises the device, and each phase is charged its own kernels.
  "Rest" is the remainder of the optimizer step (context building, clipping, AdamW, teacher
  update), reported but not compared: the paper structure below does no optimizer step.
* ``paper structure``, on the trainer's student and teacher after ours ran (its gradients and
  optimizer state freed first): one sample at a time, batch-1 sampling with the KV cache grown
  by ``torch.cat`` at every token in every layer and the sampled token read to the host at
  every step, then a teacher forward producing full (N+1, V) logits, a student forward
  producing full logits, the paper code's top-K JSD on them (as ``bench_loss.py``'s ``_paper``)
  and a backward. It runs on the same model code, so it gets the same kernels (attention,
  fused RMSNorm); what differs is the structure.

Teacher: a second bf16 copy of the model (``teacher.name = "frozen"``). The EMA teacher keeps
an fp32 copy (54 GiB) and casts every student parameter to fp32 at each update (another
54 GiB); next to the bf16 student, its gradients and AdamW's state, that does not fit one
141 GB GPU. The teacher forward, which the micro-step times, is the same forward of a second
copy either way; the update is in "rest".

Extrapolated: batch-1 sampling of 16 x 512 tokens takes about 4 minutes on an H200 (13-16 s
per sample), so only ``--baseline-samples`` of the 16 (default 2) are sampled that way, and
the sampling phase is their mean time per sample times 16; the table says so
(``--baseline-samples 16`` times them all, in about 6 minutes in all). The baseline's teacher and student
phases run on all 16 samples: on the completions it sampled itself for the first
``--baseline-samples``, on ours for the rest (random weights never stop early: every
completion has all ``--tokens`` tokens). The baseline decodes exactly ``--tokens`` tokens per
sample, sampling through an EOS (with random weights one is rare), so that both sides do the
same work.

Usage (one H200 runs the defaults in about 2 minutes, model building included)::

    python benchmarks/bench_step.py [--json out.json]
    python benchmarks/bench_step.py --set divergence.fused=true     # our fused loss
    python benchmarks/bench_step.py --flavour debug --device cpu --tokens 32 --steps 1   # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import torch

from opsd_core.components import build_components
from opsd_core.config.loader import apply_overrides, read_toml, validate_config
from opsd_core.trainer import trainer as trainer_module
from opsd_core.trainer.trainer import Trainer
from opsd_core.types import CompletionBatch
from opsd_core.rundir import MetricsLog

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "thinkmorph.toml"
PHASES = ("sampling", "teacher", "student")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- config
def bench_config(args: argparse.Namespace):
    """``examples/thinkmorph.toml`` with the random flavour, the benchmark's step shape and a bf16
    frozen teacher (see the module docstring), then the user's ``--set`` overrides."""
    if args.samples % args.micro_batch:
        raise SystemExit(f"--samples ({args.samples}) must be a multiple of --micro-batch ({args.micro_batch})")
    cuda = args.device.startswith("cuda")
    data = read_toml(CONFIG)
    data["run"] |= {"device": "cuda" if cuda else "cpu", "precision": "bf16" if cuda else "fp32"}
    data["run"]["device"] = args.device
    data["backend"] = {"name": "thinkmorph", "flavour": args.flavour}
    if args.flavour == "debug":
        data["backend"] |= {"vit_max_size": 56, "vit_min_size": 28}  # as examples/thinkmorph-debug.toml
    data["task"]["root"] = str(args.workdir / f"data-{args.data_side}")
    data["teacher"] = {"name": "frozen"}
    data["sampling"] |= {"max_completion_tokens": args.tokens, "whole_step": True, "visual_thoughts": "stored"}
    data["train"] |= {"samples_per_step": args.micro_batch, "grad_accum": args.samples // args.micro_batch}
    return validate_config(apply_overrides(data, args.overrides), source=f"{CONFIG} + benchmark settings")


# ---------------------------------------------------------------------------------------------- ours
class RecordingSampler:
    """The trainer's sampler, unchanged, keeping the last completions it returned."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.last: CompletionBatch | None = None

    def sample(self, model, contexts, generator=None, seeds=None) -> CompletionBatch:
        self.last = self.sampler.sample(model, contexts, generator, seeds=seeds)
        return self.last


@contextlib.contextmanager
def device_synchronised_trainer_clock(device: torch.device):
    """While active, the trainer's ``time.perf_counter`` waits for ``device`` before reading the
    clock, so queued kernels (a backward's, say) are charged to the phase that queued them."""

    def perf_counter() -> float:
        synchronize(device)
        return time.perf_counter()

    original = trainer_module.time
    trainer_module.time = SimpleNamespace(perf_counter=perf_counter)
    try:
        yield
    finally:
        trainer_module.time = original


def time_ours(trainer: Trainer, warmup_steps: int, steps: int) -> dict:
    """Median phase seconds of ``steps`` optimizer steps after ``warmup_steps`` (which pay for
    the gradients' and AdamW state's first allocation, cuBLAS plans and the first graph capture)."""
    device = trainer.device
    recorder = RecordingSampler(trainer.sampler)
    trainer.sampler = recorder
    for _ in range(warmup_steps):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    with device_synchronised_trainer_clock(device):
        for _ in range(steps):
            position = trainer.position
            synchronize(device)
            started = time.perf_counter()
            metrics = trainer.train_step()
            synchronize(device)
            metrics["step_s"] = time.perf_counter() - started
            records.append(metrics)
    median = {key: statistics.median(record[key] for record in records) for key in records[0]}
    phases = {"sampling": median["sample_s"], "teacher": median["teacher_s"], "student": median["student_s"]}
    micro_step = sum(phases.values())
    return {
        "phases_s": phases,
        "micro_step_s": micro_step,
        "visual_thought_s": median["visual_thought_s"],
        "rest_s": median["step_s"] - micro_step - median["visual_thought_s"],
        "step_s": median["step_s"],
        "loss": median["loss"],
        "completion_tokens_per_sample": median["completion_tokens"],
        "finished_fraction": median["finished"],
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "steps": records,
        "last_position": position,
        "last_completions": recorder.last,
    }


# ---------------------------------------------------------------------------------------------- paper structure
class CatLayerCache:
    """One layer's keys and values, grown by ``torch.cat`` at every call (the paper code's
    ``NaiveCache``): :class:`~opsd_thinkmorph.model.LayerCache`'s ``extend`` contract without
    preallocation, so every decoded token copies the whole cache of every layer."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hk, T, d) ``k`` and ``v``; return all keys and values, (B, Hk, S, d)."""
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = torch.cat([self.keys, k], dim=2)
            self.values = torch.cat([self.values, v], dim=2)
        return self.keys, self.values


class CatCache:
    """What :meth:`Bagel.llm_forward` reads of a cache: one :class:`CatLayerCache` per layer."""

    def __init__(self, num_layers: int):
        self.layers = [CatLayerCache() for _ in range(num_layers)]


@torch.no_grad()
def sample_batch_one(backend, model, context, tokens: int, temperature: float) -> list[int]:
    """``tokens`` completion tokens of one context, the paper code's way: prefill, then one
    ``llm_forward`` per token over a :class:`CatCache`, ``torch.multinomial`` over the whole
    vocabulary and the token read to the host at every step."""
    from opsd_thinkmorph.packing import TextItem, pack

    device = next(model.parameters()).device
    rows = pack([[*backend.items(context), TextItem([], open=True)]], backend.config).to(device)
    cache = CatCache(backend.config.llm.num_layers)
    embedded = model.input_embeddings(rows.token_ids, rows.images, rows.image_slots, rows.latents, rows.latent_slots)
    hidden = model.llm_forward(embedded, rows.positions, rows.mask, rows.gen, cache)  # (1, T, D)
    logits = model.lm_logits(hidden[:, -1])  # (1, V)
    position, seen = int(rows.next_positions[0]), int(rows.lengths[0])
    completion = []
    for step in range(tokens):
        token = int(torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1))  # host sync
        completion.append(token)
        if step + 1 == tokens:
            break
        seen += 1
        embedded = model.language_model.model.embed_tokens(torch.tensor([[token]], device=device))  # (1, 1, D)
        mask = torch.ones(1, 1, seen, dtype=torch.bool, device=device)  # (1, T=1, S)
        hidden = model.llm_forward(embedded, torch.tensor([[position]], device=device), mask, None, cache)
        logits = model.lm_logits(hidden[:, -1])
        position += 1
    return completion


def paper_topk_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, params) -> torch.Tensor:
    """The paper code's loss on full logits (``bench_loss.py``'s ``_paper``, from logits): the
    teacher's top-K, both gathered there, float32 log-softmax over the K entries, the mixture in
    log space, per-entry terms clamped at ``clip``, summed over K, mean over rows, times tau^2.

    Args:
        student_logits: (N, V), with gradient.
        teacher_logits: (N, V), without.
        params: the ``[divergence]`` section (``beta``, ``top_k``, ``clip``, ``temperature``).
    """
    beta, tau = params.beta, params.temperature
    with torch.no_grad():
        support = teacher_logits.topk(min(params.top_k, teacher_logits.shape[-1]), dim=-1).indices  # (N, K)
    log_s = torch.log_softmax((student_logits.gather(-1, support) / tau).float(), dim=-1)  # (N, K)
    log_t = torch.log_softmax((teacher_logits.gather(-1, support) / tau).float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    terms = beta * log_t.exp() * (log_t - log_m) + (1 - beta) * log_s.exp() * (log_s - log_m)  # (N, K)
    return terms.clamp(max=params.clip).sum(dim=-1).mean() * tau**2


def one_completion(tokens: list[int], device: torch.device) -> CompletionBatch:
    """A batch of one capped completion (never finished: the cap ended it)."""
    ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, N)
    return CompletionBatch(
        ids,
        torch.tensor([len(tokens)], device=device),
        torch.ones_like(ids, dtype=torch.bool),
        torch.tensor([False], device=device),
    )


def time_paper_structure(trainer: Trainer, pairs, ours_completions: CompletionBatch, args) -> dict:
    """Phase seconds of the paper code's structure over ``pairs`` (see the module docstring)."""
    backend, config, device = trainer.backend, trainer.config, trainer.device
    student, teacher = trainer.student, trainer.teacher
    count = len(pairs)
    measured = min(args.baseline_samples, count)
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.run.precision == "bf16")
    temperature = config.sampling.temperature
    torch.manual_seed(config.run.seed)

    student.eval()
    sample_batch_one(backend, student, pairs[0].student, 8, temperature)  # warm-up: batch-1 shapes
    sampled, sampling_s = [], []
    for pair in pairs[:measured]:
        synchronize(device)
        started = time.perf_counter()
        sampled.append(sample_batch_one(backend, student, pair.student, args.tokens, temperature))
        synchronize(device)
        sampling_s.append(time.perf_counter() - started)

    student.train()
    teacher_s = student_s = 0.0
    for index, pair in enumerate(pairs):
        own = index < measured
        completion = one_completion(sampled[index], device) if own else ours_completions.select([index])
        synchronize(device)
        started = time.perf_counter()
        with torch.no_grad(), precision:
            teacher_logits = backend.completion_logits(teacher, [pair.teacher], completion).logits[0]  # (N+1, V)
        synchronize(device)
        teacher_s += time.perf_counter() - started
        started = time.perf_counter()
        with precision:
            student_logits = backend.completion_logits(student, [pair.student], completion).logits[0]  # (N+1, V)
            loss = paper_topk_jsd(student_logits, teacher_logits, config.divergence) / count
        loss.backward()
        float(loss.detach())  # the paper code logs every micro-step's loss
        synchronize(device)
        student_s += time.perf_counter() - started
        del teacher_logits, student_logits, loss

    phases = {"sampling": statistics.mean(sampling_s) * count, "teacher": teacher_s, "student": student_s}
    return {
        "phases_s": phases,
        "micro_step_s": sum(phases.values()),
        "sampling_measured_s": sampling_s,
        "sampling_extrapolated": measured < count,
        "sampling_extrapolated_from": measured,
        "completions": f"its own for samples 1-{measured}, ours for the other {count - measured}"
        if measured < count
        else "its own",
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


# ---------------------------------------------------------------------------------------------- report
def print_table(result: dict) -> None:
    ours, paper, ratio = result["ours"], result["paper_structure"], result["ratio"]
    note = (
        f" (extrapolated: {paper['sampling_extrapolated_from']} of {result['settings']['samples']} samples "
        f"timed, x{result['settings']['samples'] / paper['sampling_extrapolated_from']:g})"
        if paper["sampling_extrapolated"]
        else ""
    )
    labels = {"sampling": "sampling", "teacher": "teacher forward", "student": "student fwd + loss + bwd"}
    print("\n| phase | ours s | paper structure s | paper / ours |\n|---|---|---|---|")
    for phase in PHASES:
        shown = f"{paper['phases_s'][phase]:.2f}{note if phase == 'sampling' else ''}"
        print(f"| {labels[phase]} | {ours['phases_s'][phase]:.2f} | {shown} | {ratio[phase]:.1f}x |")
    print(f"| micro-step total | {ours['micro_step_s']:.2f} | {paper['micro_step_s']:.2f} | {ratio['total']:.1f}x |")
    print(
        f"\nours, rest of the optimizer step (not compared: context building, clipping, AdamW, teacher "
        f"update): {ours['rest_s']:.2f} s; whole step {ours['step_s']:.2f} s"
    )
    if ours["peak_gib"] is not None:
        print(f"peak GPU memory: ours {ours['peak_gib']:.1f} GiB, paper structure {paper['peak_gib']:.1f} GiB")
    print(f"paper structure's completions for its teacher and student phases: {paper['completions']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="completions per micro-step")
    parser.add_argument("--tokens", type=int, default=512, help="completion cap (random weights reach it)")
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per student forward + backward")
    parser.add_argument("--baseline-samples", type=int, default=2, help="samples the paper structure decodes")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (medians)")
    parser.add_argument("--data-side", type=int, default=448, help="image side of the synthetic dataset")
    parser.add_argument("--flavour", default="7b-random", help="'debug' (with --device cpu) smoke-tests the script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, as opsd run --set")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "opsd-bench-step")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.steps < 1 or args.baseline_samples < 1:
        raise SystemExit("--steps and --baseline-samples must be at least 1")

    config = bench_config(args)
    data = Path(config.task.root)
    if not data.exists():
        from opsd_thinkmorph.demo_data import write_demo_dataset

        write_demo_dataset(data, rows_per_dataset=16, side=args.data_side, seed=0)
    components = build_components(config)
    backend = components.backend
    if backend.device.type == "cuda":
        # bf16 weights for the student too (see the module docstring): the benchmark's one-GPU budget.
        backend.place(backend.device, torch.bfloat16)
    started = time.perf_counter()
    student = backend.build_model().requires_grad_(True)
    trainer = Trainer(components, student, args.workdir / "phase", MetricsLog(args.workdir / "metrics.jsonl"))
    build_s = time.perf_counter() - started
    print(f"built student and teacher in {build_s:.1f} s", flush=True)

    ours = time_ours(trainer, args.warmup_steps, args.steps)
    print(json.dumps({"ours": {k: v for k, v in ours.items() if k not in ("steps", "last_completions")}}), flush=True)
    problems = list(islice(components.task.train_problems(config.run.seed, start=ours["last_position"]), args.samples))
    pairs = [trainer.builder.build(problem) for problem in problems]
    completions = ours.pop("last_completions")
    trainer.release_optimizer()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    paper = time_paper_structure(trainer, pairs, completions, args)

    device = trainer.device
    result = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "settings": {
            "flavour": args.flavour,
            "samples": args.samples,
            "tokens": args.tokens,
            "micro_batch": args.micro_batch,
            "baseline_samples": min(args.baseline_samples, args.samples),
            "student_prompt_tokens": backend.context_length(pairs[0].student),
            "teacher_prompt_tokens": backend.context_length(pairs[0].teacher),
            "image_side": args.data_side,
            "divergence_fused": bool(getattr(config.divergence, "fused", False)),
            "build_s": build_s,
        },
        "ours": ours,
        "paper_structure": paper,
        "ratio": {phase: paper["phases_s"][phase] / ours["phases_s"][phase] for phase in PHASES}
        | {"total": paper["micro_step_s"] / ours["micro_step_s"]},
    }
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
