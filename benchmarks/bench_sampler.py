"""On-policy sampling throughput on one GPU: our sampler against transformers' ``generate``.

Side by side in one process, with random bf16 weights (they never stop early, so every row
decodes all ``--tokens`` tokens):

* ``opsd``: :class:`~opsd_core.sampling.BatchedSampler` driving the ``thinkmorph`` backend's
  full-size BAGEL-7B-MoT (``7b-random``): prefill, CUDA-graph replayed decode steps, sampling
  at temperature 1, the image-skip bookkeeping, at batch 1, 16 and 64, on contexts with one
  448x448 image;
* ``opsd, 2 micro-batches apart`` vs ``together``: two batch-1 samplings against one batch-2
  sampling (what ``sampling.whole_step`` changes in a step of 2 micro-batches);
* ``transformers generate``: a Qwen2-7B-shaped ``Qwen2ForCausalLM`` with random weights (the
  same decoder as ThinkMorph's understanding path) sampling with its default dynamic cache, at
  the same batch sizes, from a prompt of the same length;
* ``--sync-baseline``: our sampler with the host looking at the batch after every token
  (``sync_every = 1``) against the default (every 16 tokens);
* ``--naive``: the paper code's way on that model: batch 1, the KV cache grown by concatenation
  at every token, the sampled token read back to the host at every step.

Usage::

    python benchmarks/bench_sampler.py [--tokens 512] [--batches 1 16 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from opsd_core.sampling import BatchedSampler
from opsd_core.types import Problem
from opsd_thinkmorph.backend import ThinkMorphBackend
from opsd_thinkmorph.config import ThinkMorphParams


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def contexts(backend, batch: int, side: int = 448):
    builder = backend.context_builder()
    generator = torch.Generator().manual_seed(0)
    return [
        builder.student_context(Problem(f"p{i}", torch.rand(3, side, side, generator=generator), f"Question {i}: which way?"))
        for i in range(batch)
    ]


def time_sampler(backend, model, batch: int, tokens: int, sync_every: int | None = None) -> dict:
    sampler = BatchedSampler(backend, 1.0, tokens, max_image_skips=1, sync_every=sync_every)
    rows = contexts(backend, batch)
    generator = torch.Generator(device=backend.device).manual_seed(0)
    sampler.sample(model, rows[:batch], generator)  # warm-up: graph capture for this batch size
    synchronize()
    started = time.perf_counter()
    completions = sampler.sample(model, rows, generator)
    synchronize()
    seconds = time.perf_counter() - started
    produced = int(completions.lengths.sum())
    return {"batch": batch, "sync_every": sampler.sync_every, "tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}


def time_micro_batches(backend, model, tokens: int) -> dict:
    sampler = BatchedSampler(backend, 1.0, tokens, max_image_skips=1)
    rows = contexts(backend, 2)
    generator = torch.Generator(device=backend.device).manual_seed(0)
    sampler.sample(model, rows[:1], generator)
    sampler.sample(model, rows, generator)
    synchronize()
    started = time.perf_counter()
    for row in rows:
        sampler.sample(model, [row], generator)
    synchronize()
    apart = time.perf_counter() - started
    started = time.perf_counter()
    sampler.sample(model, rows, generator)
    synchronize()
    together = time.perf_counter() - started
    return {"apart_seconds": apart, "together_seconds": together, "speedup": apart / together}


def time_generate(batches, tokens: int, prompt: int) -> list[dict]:
    model = _qwen2_7b()
    results = []
    for batch in batches:
        ids = torch.randint(0, 150_000, (batch, prompt), device="cuda")
        kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=tokens, max_new_tokens=tokens)
        with torch.no_grad():
            model.generate(ids, **{**kwargs, "min_new_tokens": 8, "max_new_tokens": 8})
            synchronize()
            started = time.perf_counter()
            out = model.generate(ids, **kwargs)
            synchronize()
        seconds = time.perf_counter() - started
        produced = batch * (out.shape[1] - prompt)
        results.append({"batch": batch, "tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds})
    del model
    torch.cuda.empty_cache()
    return results


def time_naive_loop(tokens: int, prompt: int) -> dict:
    """Batch 1, the KV cache grown by concatenation at every token, the sampled token read back
    to the host at every step (how the paper's code samples), on the Qwen2-7B-shaped model."""
    from transformers import DynamicCache

    model = _qwen2_7b()
    ids = torch.randint(0, 150_000, (1, prompt), device="cuda")

    def run(count: int) -> int:
        cache = DynamicCache()  # appends each step's keys and values with torch.cat
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        produced = 0
        for _ in range(count):
            token = int(torch.multinomial(torch.softmax(logits.float(), dim=-1), 1))  # host sync
            produced += 1
            step = torch.tensor([[token]], device="cuda")
            logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[:, -1]
        return produced

    with torch.no_grad():
        run(8)
        synchronize()
        started = time.perf_counter()
        produced = run(tokens)
        synchronize()
    seconds = time.perf_counter() - started
    del model
    torch.cuda.empty_cache()
    return {"batch": 1, "tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}


def _qwen2_7b():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32_768, rope_theta=1e6,
    )  # fmt: skip
    with torch.device("cuda"):
        return Qwen2ForCausalLM(config).to(torch.bfloat16).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--naive", action="store_true", help="also time the paper-style batch-1 loop (torch.cat cache)")
    parser.add_argument("--json")
    parser.add_argument(
        "--sync-baseline", action="store_true",
        help="also sample with the host looking at the batch after every token (sync_every = 1), side by side",
    )
    parser.add_argument("--flavour", default="7b-random", help="'debug' (with --device cpu) smoke-tests the script")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    backend = ThinkMorphBackend(ThinkMorphParams(flavour=args.flavour)).place(args.device, getattr(torch, dtype))
    model = backend.build_model().eval()
    prompt = backend.context_length(contexts(backend, 1)[0])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"device": device, "torch": torch.__version__, "prompt_tokens": prompt}
    results["opsd"] = [time_sampler(backend, model, batch, args.tokens) for batch in args.batches]
    for row in results["opsd"]:
        print(json.dumps({"opsd": row}), flush=True)
    if args.sync_baseline:
        results["opsd_sync_every_token"] = [time_sampler(backend, model, batch, args.tokens, 1) for batch in args.batches]
        for ours, synced in zip(results["opsd"], results["opsd_sync_every_token"]):
            speedup = ours["tokens_per_s"] / synced["tokens_per_s"]
            print(json.dumps({"opsd_sync_every_token": synced, "speedup": speedup}), flush=True)
    results["micro_batches"] = time_micro_batches(backend, model, args.tokens)
    print(json.dumps({"micro_batches": results["micro_batches"]}), flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if args.naive:
        results["naive_loop"] = time_naive_loop(args.tokens, prompt)
        ours = results["opsd"][0]
        print(json.dumps({"naive_loop": results["naive_loop"], "opsd_batch": ours["batch"],
                          "speedup": ours["tokens_per_s"] / results["naive_loop"]["tokens_per_s"]}), flush=True)
    if not args.skip_generate:
        results["generate"] = time_generate(args.batches, args.tokens, prompt)
        for row in results["generate"]:
            print(json.dumps({"generate": row}), flush=True)
    print("\n| batch | opsd tokens/s | transformers generate tokens/s | ratio |\n|---|---|---|---|")
    for ours, theirs in zip(results["opsd"], results.get("generate", [{}] * len(results["opsd"]))):
        rate = theirs.get("tokens_per_s")
        shown = f"{rate:.0f} | {ours['tokens_per_s'] / rate:.2f}x" if rate else "- | -"
        print(f"| {ours['batch']} | {ours['tokens_per_s']:.0f} | {shown} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
