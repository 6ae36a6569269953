"""Extra peak memory and time of the loss, ours vs. unchunked baselines, side by side.

Each measurement runs in a fresh subprocess so peaks do not mix. "Extra" is the peak during
forward + backward minus the inputs and minus the student-logits gradient, i.e. what the loss
itself holds. Baselines on the same inputs:

- ``paper-topk``: the paper code's formulation: teacher top-K, gather both, float32
  log-softmax over the K entries, mixture, per-entry clip, autograd through all of it.
- ``full-naive``: a full-vocabulary generalized JSD with autograd through float32 (N, V)
  intermediates (the usual unchunked implementation).

Usage::

    python benchmarks/bench_divergence_memory.py                 # small, CPU, ~1 min
    python benchmarks/bench_divergence_memory.py --full          # N=8192, V=152064 (bf16)
    python benchmarks/bench_divergence_memory.py --full --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

GIB = 1024**3


def _paper_topk(student, teacher, beta, top_k, clip):
    import torch

    with torch.no_grad():
        support = teacher.topk(top_k, dim=-1).indices
    s = torch.log_softmax(student.gather(-1, support).float(), dim=-1)
    t = torch.log_softmax(teacher.gather(-1, support).float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    terms = beta * t.exp() * (t - log_m) + (1 - beta) * s.exp() * (s - log_m)
    return terms.clamp(max=clip).sum(-1).mean()


def _full_naive(student, teacher, beta):
    import torch

    s = torch.log_softmax(student.float(), dim=-1)
    t = torch.log_softmax(teacher.float(), dim=-1)
    log_m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
    terms = beta * t.exp() * (t - log_m) + (1 - beta) * s.exp() * (s - log_m)
    return terms.sum(-1).mean()


def _rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _loss(method, student, teacher, top_k, chunk_size):
    from opsd_core.divergences import generalized_jsd

    if method == "ours-topk":
        return generalized_jsd(student, teacher, beta=0.5, top_k=top_k, clip=0.05, chunk_size=chunk_size)
    if method == "ours-full":
        return generalized_jsd(student, teacher, beta=0.5, chunk_size=chunk_size)
    if method == "paper-topk":
        return _paper_topk(student, teacher, 0.5, top_k, 0.05)
    return _full_naive(student, teacher, 0.5)


def measure(method: str, rows: int, vocab: int, device: str, top_k: int, chunk_size: int | None, repeats: int) -> dict:
    """One measurement in this process (called in a subprocess): a warm-up pass on a slice,
    then the peak of one full pass and the mean time of ``repeats`` passes."""
    import torch

    torch.manual_seed(0)
    student = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16).requires_grad_(True)
    teacher = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16)
    gradient_bytes = student.numel() * student.element_size()
    warm = student[:64].detach().clone().requires_grad_(True)
    _loss(method, warm, teacher[:64], min(top_k, vocab), chunk_size).backward()
    del warm
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    times = []
    for _ in range(repeats):
        student.grad = None
        started = time.perf_counter()
        loss = _loss(method, student, teacher, top_k, chunk_size)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        if device == "cuda" and len(times) == 1:
            peak = torch.cuda.max_memory_allocated()
    if device != "cuda":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = (peak - before - gradient_bytes) / GIB
    return {"method": method, "extra_gib": extra, "seconds": sum(times) / len(times), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--full", action="store_true", help="N = 8192 rows, V = 152,064 (the paper's shapes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--top-k", type=int, default=256)
    parser.add_argument("--methods", default="ours-topk,paper-topk,ours-full,full-naive")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk for ours (default: automatic)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows, vocab = (8192, 152064) if args.full else (args.rows, args.vocab)
    if args.one:
        print(json.dumps(measure(args.one, rows, vocab, args.device, args.top_k, args.chunk_size, args.repeats)))
        return
    print(f"N={rows} V={vocab} bf16 inputs ({rows * vocab * 2 / GIB:.2f} GiB each), device={args.device}, top_k={args.top_k}")
    results = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--one", method, "--rows", str(rows), "--vocab", str(vocab),
                   "--device", args.device, "--top-k", str(args.top_k), "--repeats", str(args.repeats)]
        if args.chunk_size:
            command += ["--chunk-size", str(args.chunk_size)]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            print(f"{method:11s} failed: {completed.stderr.strip().splitlines()[-1] if completed.stderr else completed.returncode}")
            continue
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    print(f"{'method':11s} {'extra peak GiB':>15s} {'seconds':>9s} {'loss':>10s}")
    for result in results:
        print(f"{result['method']:11s} {result['extra_gib']:15.3f} {result['seconds']:9.3f} {result['loss']:10.5f}")
    by = {result["method"]: result for result in results}
    for ours, baseline in (("ours-topk", "paper-topk"), ("ours-full", "full-naive")):
        if ours in by and baseline in by and by[ours]["extra_gib"] > 0:
            ratio = by[baseline]["extra_gib"] / by[ours]["extra_gib"]
            print(f"{baseline} / {ours} extra memory: {ratio:.1f}x; time {by[baseline]['seconds'] / by[ours]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
