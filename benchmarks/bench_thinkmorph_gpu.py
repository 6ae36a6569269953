"""Full-size BAGEL-7B-MoT (random weights, bf16) on one GPU: the costs of one OPSD step's parts.

Measures, with the ``thinkmorph`` backend's ``7b-random`` flavour:
* student forward + backward on a ~4k-token teacher pack (time and peak memory);
* KV-cached decoding tokens/s at batch 1 and batch 16 (the on-policy sampler's inner loop);
* visual-thought drawing time per 512x512 image (50 flow points, three-context guidance);
* ``--only latency``: a batch-1 text answer through the evaluation sampler (greedy, up to
  ``--text-tokens``) warm, beside prefill plus as many decode steps of the backend's decoder
  (the ratio; the target is 1.3 or less), the cold first answer (building, compiling and
  capturing its decoder) and an answer with no decoder kept (``kept_decoders = 0``, a new one
  per answer) apart; batched evaluation throughput (answers/s at ``--eval-batches``); and,
  unless ``--skip-vt``, the text vs visual-thought latency of the paper's comparison.

Weights are random, so what the model says is meaningless; the arithmetic is the real model's.

    python benchmarks/bench_thinkmorph_gpu.py [--json out.json] [--skip-vt] [--only latency]
    python benchmarks/bench_thinkmorph_gpu.py --only latency --flavour debug --device cpu --text-tokens 24 --eval-batches 2 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Sequence

import torch

from opsd_core.types import CompletionBatch, Problem
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams


PROFILE = False


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def image(side: int, seed: int) -> torch.Tensor:
    return torch.rand(3, side, side, generator=torch.Generator().manual_seed(seed))


def forward_backward(backend, model, results: dict, image_side: int, completion_tokens: int) -> None:
    problem = Problem("bench", image(image_side, 0), "Which path leads from the start to the goal? " * 4)
    pair = backend.context_builder().build(problem, image(image_side, 1))
    tokens = torch.randint(0, backend.vocabulary.valid_size, (1, completion_tokens))
    completions = CompletionBatch(
        tokens, torch.tensor([completion_tokens]), torch.ones(1, completion_tokens, dtype=torch.bool),
        torch.tensor([True]),
    )
    pack_length = backend.context_length(pair.teacher) + completion_tokens
    model.train()

    def step():
        rows = backend.completion_logits(model, [pair.teacher], completions)
        loss = torch.logsumexp(rows.logits.float(), dim=-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=False)

    timed(step, 1)  # warm-up: allocates the gradients
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, 3)
    results["student_fwd_bwd"] = {
        "pack_tokens": pack_length,
        "seconds": sorted(times)[1],
        "tokens_per_s": pack_length / sorted(times)[1],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "note": "bf16 weights and bf16 gradients, no activation checkpointing, one GPU",
    }
    model.zero_grad(set_to_none=True)
    model.eval()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def repeated_kv_heads():
    """Decode with keys and values copied per query head before attention (the baseline)."""
    import torch.nn.functional as F

    from opsd_thinkmorph import model as bagel

    def repeated(q, k, v, mask):
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), attn_mask=mask
        )

    original = bagel.grouped_query_attention
    bagel.grouped_query_attention = repeated
    try:
        yield
    finally:
        bagel.grouped_query_attention = original


@torch.no_grad()
def decoding(backend, model, results: dict, batch: int, steps: int, image_side: int) -> None:
    builder = backend.context_builder()
    contexts = [
        builder.student_context(Problem(f"p{i}", image(image_side, i), f"Question {i}: where is the goal?"))
        for i in range(batch)
    ]
    state = backend.start_decoding(model, contexts, steps + 16)  # same shapes as the timed state: compiled once
    feed = torch.full((batch,), 65, dtype=torch.long, device=backend.device)
    for _ in range(4):  # warm-up inside the same cache
        backend.decode_step(state, feed)
    del state  # its decoder is kept: the timed state replays it
    start_prefill = time.perf_counter()
    fresh = backend.start_decoding(model, contexts, steps + 16)
    synchronize()
    prefill = time.perf_counter() - start_prefill

    def run():
        for _ in range(steps):
            backend.decode_step(fresh, feed)

    seconds = timed(run, 1)[0]
    if PROFILE:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
            for _ in range(8):
                backend.decode_step(fresh, feed)
            synchronize()
        print(trace.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
        print(trace.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
    results[f"decode_batch_{batch}"] = {
        "context_tokens": backend.context_length(contexts[0]),
        "steps": steps,
        "prefill_seconds": prefill,
        "tokens_per_s": batch * steps / seconds,
        "ms_per_step": 1000 * seconds / steps,
    }


def side_by_side(backend, model, results: dict, batch: int, baseline_backend, name: str) -> None:
    """Decode with ``baseline_backend`` (under whatever the caller changed), then with ours again
    right after, and print both with the speedup; the baseline stays in ``results`` under
    ``decode_batch_{batch}_{name}``."""
    key = f"decode_batch_{batch}"
    decoding(baseline_backend, model, results, batch, steps=64, image_side=448)
    baseline = results[f"{key}_{name}"] = results.pop(key)
    decoding(backend, model, results, batch, steps=64, image_side=448)
    ratio = results[key]["tokens_per_s"] / baseline["tokens_per_s"]
    print(json.dumps({"ours": results[key], name: baseline, "speedup": ratio}), flush=True)


@torch.no_grad()
def visual_thought(backend, model, results: dict, side: int, batch: int) -> None:
    problems = [Problem(f"vt{i}", image(side, i), "Draw the path from start to goal.") for i in range(batch)]
    backend.generate_visual_thought(model, problems[:1], torch.Generator().manual_seed(0))  # warm-up (VAE build)
    seconds = timed(lambda: backend.generate_visual_thought(model, problems, torch.Generator().manual_seed(0)), 1)[0]
    p = backend.params
    results[f"visual_thought_batch_{batch}"] = {
        "image": f"{side}x{side}",
        "seconds_per_image": seconds / batch,
        "flow_points": p.vt_timesteps,
        "guidance": {"text": p.vt_text_scale, "image": p.vt_image_scale, "interval": list(p.vt_interval)},
    }


def benchmark_contexts(backend, count: int, side: int) -> list:
    """``count`` benchmark-style contexts (system prompt, a ``side`` x ``side`` image, a
    two-option question), each with its own image and question."""
    from opsd_core.evaluation.benchmarks import BenchmarkItem
    from opsd_core.evaluation.harness import item_context

    return [
        item_context(backend, BenchmarkItem(
            "bench", i, "-", (image(side, i),), f"Question {i}: which way leads to the goal?", {"A": "left", "B": "right"}, "A",
        ))
        for i in range(count)
    ]


@torch.no_grad()
def text_latency(backend, model, results: dict, tokens: int, side: int, eval_batches: Sequence[int]) -> None:
    """Batch-1 answers through the evaluation sampler (greedy, up to ``tokens``): the cold first
    one, warm ones, one with a new decoder per answer, and prefill plus as many decode steps of
    the backend alone (what a warm answer should cost); then answers/s of evaluation batches."""
    from opsd_core.evaluation.evaluate import greedy_decode, greedy_sampler

    contexts = benchmark_contexts(backend, max(4, 2 * max(eval_batches, default=1)), side)
    sampler = greedy_sampler(backend, tokens)

    def answer(chosen: list, sampler=sampler) -> list[list[int]]:
        return greedy_decode(sampler, model, chosen, len(chosen))

    cold = timed(lambda: answer(contexts[:1]), 1)[0]
    builds = backend.decoders.builds
    warm, answered = [], []
    for context in contexts[1:4]:
        synchronize()
        started = time.perf_counter()
        answered.append(len(answer([context])[0]))
        synchronize()
        warm.append(time.perf_counter() - started)
    warm_builds = backend.decoders.builds - builds
    steps = answered[-1]
    feed = torch.full((1,), 65, dtype=torch.long, device=backend.device)

    def prefill_and_steps():
        state = backend.start_decoding(model, contexts[3:4], tokens)
        for _ in range(steps - 1):  # the sampler's first token comes from the prefill's logits
            backend.decode_step(state, feed)

    decoder = sorted(timed(prefill_and_steps, 3))[1]
    rebuilding = ThinkMorphBackend(backend.params.model_copy(update={"kept_decoders": 0})).place(backend.device, backend.dtype)
    rebuilt = timed(lambda: answer(contexts[3:4], greedy_sampler(rebuilding, tokens)), 1)[0]
    median = sorted(warm)[len(warm) // 2]
    results["text_latency_batch_1"] = {
        "tokens_asked": tokens,
        "tokens_answered": answered,
        "context_tokens": backend.context_length(contexts[3]),
        "cold_first_answer_seconds": cold,
        "warm_answer_seconds": warm,
        "warm_answer_median_seconds": median,
        "decoders_built_while_warm": warm_builds,
        "prefill_plus_steps_seconds": decoder,
        "decode_steps": steps - 1,
        "warm_over_prefill_plus_steps": median / decoder,
        "target_ratio": 1.3,
        "new_decoder_per_answer_seconds": rebuilt,
    }
    for batch in eval_batches:
        chosen = contexts[: 2 * batch]
        greedy_decode(sampler, model, chosen[:batch], batch)  # builds (compiles, captures) this batch size's decoder
        builds = backend.decoders.builds
        synchronize()
        started = time.perf_counter()
        completions = greedy_decode(sampler, model, chosen, batch)
        synchronize()
        seconds = time.perf_counter() - started
        results[f"eval_batch_{batch}"] = {
            "answers": len(chosen),
            "seconds": seconds,
            "answers_per_s": len(chosen) / seconds,
            "seconds_per_sample": seconds / len(chosen),
            "tokens_per_s": sum(len(c) for c in completions) / seconds,
            "mean_tokens": sum(len(c) for c in completions) / len(chosen),
            "decoders_built_while_timed": backend.decoders.builds - builds,
        }


@torch.no_grad()
def vt_latency(backend, model, results: dict, text_tokens: int, vt_tokens: int, side: int) -> None:
    """Seconds per sample at batch 1: answering in text (``text_tokens`` decoded) against drawing a
    ``side`` x ``side`` visual thought first and answering with it (``vt_tokens`` decoded), the
    paper's latency comparison (10.0 s vs 142.8 s for ThinkMorph on its hardware)."""
    from opsd_core.evaluation.benchmarks import BenchmarkItem
    from opsd_core.evaluation.harness import item_context

    item = BenchmarkItem("bench", 0, "-", (image(side, 0),), "Which way leads to the goal?", {"A": "left", "B": "right"}, "A")
    feed = torch.full((1,), 65, dtype=torch.long, device=backend.device)

    def answer(thought, tokens):
        state = backend.start_decoding(model, [item_context(backend, item, thought)], tokens + 1)
        for _ in range(tokens):
            backend.decode_step(state, feed)

    def vt_sample():
        thought = backend.generate_visual_thought(model, [Problem("bench", image(side, 0), "draw")], None)[0]
        answer(thought, vt_tokens)

    answer(None, 8)  # warm-up
    text_s = timed(lambda: answer(None, text_tokens), 1)[0]
    vt_s = timed(vt_sample, 1)[0]
    results["latency"] = {
        "text_seconds": text_s,
        "text_tokens": text_tokens,
        "vt_seconds": vt_s,
        "vt_tokens": vt_tokens,
        "vt_image": f"{side}x{side}",
        "ratio": vt_s / text_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--skip-vt", action="store_true", help="skip visual-thought drawing")
    parser.add_argument("--pack-image-side", type=int, default=616, help="problem and VT image side of the pack")
    parser.add_argument("--completion-tokens", type=int, default=256)
    parser.add_argument("--flavour", default="7b-random", help="'debug' (with --device cpu) smoke-tests the script")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile-decode", action="store_true", help="print a torch profile of decode steps")
    parser.add_argument("--only", choices=["all", "decode", "vt", "latency"], default="all")
    parser.add_argument("--text-tokens", type=int, default=200, help="latency: tokens of a text answer at most")
    parser.add_argument("--eval-batches", type=int, nargs="*", default=[8, 32], help="latency: evaluation batch sizes")
    parser.add_argument(
        "--attention-baseline", action="store_true",
        help="also decode with the KV heads copied per query head (the previous attention), side by side",
    )
    parser.add_argument(
        "--compile-baseline", action="store_true",
        help="also decode without torch.compile (CUDA graphs of eager layers), side by side",
    )
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile_decode
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --flavour debug --device cpu)")
    small = dict(vit_max_size=56, vit_min_size=28, vae_max_size=64, vae_min_size=32) if args.flavour == "debug" else {}
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    params = ThinkMorphParams(flavour=args.flavour, **small)
    backend = ThinkMorphBackend(params).place(args.device, dtype)
    start = time.perf_counter()
    model = backend.build_model()
    synchronize()
    parameters = sum(p.numel() for p in model.parameters())
    results: dict = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "parameters": parameters,
        "build_seconds": time.perf_counter() - start,
        "weights_gib": parameters * model.connector.fc1.weight.element_size() / 2**30,
    }
    print(json.dumps(results), flush=True)
    if args.only == "all":
        forward_backward(backend, model, results, args.pack_image_side, args.completion_tokens)
        print(json.dumps(results["student_fwd_bwd"]), flush=True)
    for batch in (1, 16, 64) if args.only in ("all", "decode") else ():
        decoding(backend, model, results, batch, steps=64, image_side=448)
        print(json.dumps(results[f"decode_batch_{batch}"]), flush=True)
        if args.attention_baseline:
            # A backend of its own: the decoders ours keeps were captured with the current attention.
            copying = ThinkMorphBackend(params.model_copy(update={"kept_decoders": 0})).place(args.device, dtype)
            with repeated_kv_heads():
                side_by_side(backend, model, results, batch, copying, "repeated_kv")
        if args.compile_baseline:
            eager = ThinkMorphBackend(params.model_copy(update={"compile_decoding": False})).place(args.device, dtype)
            side_by_side(backend, model, results, batch, eager, "not_compiled")
    if not args.skip_vt and args.only in ("all", "vt"):
        visual_thought(backend, model, results, side=512, batch=1)
        print(json.dumps(results["visual_thought_batch_1"]), flush=True)
    if args.only in ("all", "latency"):
        text_latency(backend, model, results, args.text_tokens, side=512, eval_batches=args.eval_batches)
        for key in ("text_latency_batch_1", *(f"eval_batch_{batch}" for batch in args.eval_batches)):
            print(json.dumps({key: results[key]}), flush=True)
        if not args.skip_vt:
            vt_latency(backend, model, results, text_tokens=args.text_tokens, vt_tokens=450, side=512)
            print(json.dumps(results["latency"]), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
