"""Extra peak memory and time of the JSD loss, forward + backward: ours against unchunked
baselines measured in the same run, printed as a table with ratios.

"Extra" is what the loss itself holds at its peak: the peak during forward + backward minus
the memory before it (the bf16 student and teacher logits) minus the student gradient
(N x V in bf16, which any implementation must return). Each measurement runs in a fresh
subprocess, so peaks never mix. On CPU the peak is the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs after the inputs exist); on CUDA it is
torch.cuda.max_memory_allocated.

Methods (all beta = 0.5; the top-K ones use K = 256 and per-entry clip 0.05, the paper's):

- ``ours``: ``generalized_jsd(..., top_k=256, clip=0.05)``.
- ``paper``: the paper code's formulation: teacher top-K under no_grad, gather both in bf16,
  float32 log-softmax over the K entries, mixture, per-entry clamp, autograd through all.
- ``naive``: float32 log-softmax of both over the whole vocabulary, then top-K, gather and
  renormalise the K log-probs, autograd through all.
- ``ours-full`` / ``naive-full``: the same without top-K or clip, over the whole vocabulary.

Usage::

    python benchmarks/bench_divergence_memory.py                    # N=512, V=32768, CPU, ~1 min
    python benchmarks/bench_divergence_memory.py --full             # N=8192, V=152064 (bf16 inputs 2.3 GiB each)
    python benchmarks/bench_divergence_memory.py --full --device cuda
    python benchmarks/bench_divergence_memory.py --rows 2048 --vocab 152064 --methods naive,naive-full
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

GIB = 1024**3
BETA, TOP_K, CLIP = 0.5, 256, 0.05
METHODS = ("ours", "paper", "naive", "ours-full", "naive-full")
BASELINE_OF = {"paper": "ours", "naive": "ours", "naive-full": "ours-full"}


def _mixture_terms(log_s, log_t, beta):
    """float32 per-entry JSD terms from log-probs (the baselines' own, unfused formula)."""
    import torch

    log_m = torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)
    return beta * log_t.exp() * (log_t - log_m) + (1 - beta) * log_s.exp() * (log_s - log_m)


def _loss(method: str, student, teacher, top_k: int):
    import torch

    if method in ("ours", "ours-full"):
        from opsd_core.divergences import generalized_jsd

        if method == "ours":
            return generalized_jsd(student, teacher, beta=BETA, top_k=top_k, clip=CLIP)
        return generalized_jsd(student, teacher, beta=BETA)
    if method == "paper":
        with torch.no_grad():
            support = teacher.topk(top_k, dim=-1).indices  # (N, K)
        log_s = torch.log_softmax(student.gather(-1, support).float(), dim=-1)  # (N, K)
        log_t = torch.log_softmax(teacher.gather(-1, support).float(), dim=-1)  # (N, K)
        return _mixture_terms(log_s, log_t, BETA).clamp(max=CLIP).sum(-1).mean()
    log_s = torch.log_softmax(student.float(), dim=-1)  # (N, V)
    log_t = torch.log_softmax(teacher.float(), dim=-1)  # (N, V)
    if method == "naive":
        support = teacher.topk(top_k, dim=-1).indices  # (N, K)
        log_s = log_s.gather(-1, support)
        log_s = log_s - log_s.logsumexp(-1, keepdim=True)  # (N, K)
        log_t = log_t.gather(-1, support)
        log_t = log_t - log_t.logsumexp(-1, keepdim=True)  # (N, K)
        return _mixture_terms(log_s, log_t, BETA).clamp(max=CLIP).sum(-1).mean()
    return _mixture_terms(log_s, log_t, BETA).sum(-1).mean()


def _random_bf16(rows: int, vocab: int, device: str, seed: int):
    """bf16 (rows, vocab) standard normal logits, drawn 256 rows at a time so that no float32
    copy of the whole tensor inflates the peak before the measurement starts."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(rows, vocab, dtype=torch.bfloat16, device=device)
    for start in range(0, rows, 256):
        block = out[start : start + 256]
        block.copy_(torch.randn(block.shape, generator=generator, device=device))
    return out


def _read_status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def measure(method: str, rows: int, vocab: int, device: str, top_k: int) -> dict:
    """One forward + backward of ``method`` in this process; returns its extra peak and time."""
    import torch

    student = _random_bf16(rows, vocab, device, 0).requires_grad_(True)
    teacher = _random_bf16(rows, vocab, device, 1)
    warm = student[:8].detach().clone().requires_grad_(True)
    _loss(method, warm, teacher[:8], min(top_k, vocab)).backward()
    del warm
    gradient_bytes = student.numel() * student.element_size()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        exact = _reset_cpu_peak()
        before = _read_status("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    loss = _loss(method, student, teacher, top_k)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _read_status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": method,
        "extra_gib": (peak - before - gradient_bytes) / GIB,
        "seconds": seconds,
        "loss": float(loss.detach()),
        "exact_peak": device == "cuda" or exact,
    }


def _run_one(method: str, args: argparse.Namespace, rows: int, vocab: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--one", method, "--rows", str(rows), "--vocab", str(vocab),
               "--device", args.device, "--top-k", str(args.top_k)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        reason = completed.stderr.strip().splitlines()[-1] if completed.stderr.strip() else f"exit {completed.returncode}"
        if completed.returncode < 0:
            reason = f"killed by signal {-completed.returncode} (out of memory?)"
        return {"method": method, "error": reason}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512, help="N, rows of logits")
    parser.add_argument("--vocab", type=int, default=32768, help="V, vocabulary size")
    parser.add_argument("--full", action="store_true", help="the paper's shapes: N=8192, V=152064")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--top-k", type=int, default=TOP_K)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows, vocab = (8192, 152064) if args.full else (args.rows, args.vocab)
    if args.one:
        print(json.dumps(measure(args.one, rows, vocab, args.device, args.top_k)))
        return
    print(f"N={rows} V={vocab}: bf16 inputs {rows * vocab * 2 / GIB:.2f} GiB each, gradient {rows * vocab * 2 / GIB:.2f} GiB; "
          f"device={args.device}; beta={BETA}, top-K methods K={args.top_k}, clip={CLIP} per entry")
    results = {}
    for method in args.methods.split(","):
        results[method] = _run_one(method, args, rows, vocab)
        print(f"  measured {method}", file=sys.stderr, flush=True)
    print(f"{'method':11s} {'extra peak GiB':>14s} {'seconds':>9s} {'loss':>9s}   vs ours: memory, time")
    for method, result in results.items():
        if "error" in result:
            print(f"{method:11s} failed: {result['error']}")
            continue
        line = f"{method:11s} {result['extra_gib']:14.3f} {result['seconds']:9.2f} {result['loss']:9.5f}"
        ours = results.get(BASELINE_OF.get(method, ""), {})
        if "extra_gib" in ours:
            line += f"   {result['extra_gib'] / max(ours['extra_gib'], 1e-3):6.1f}x {result['seconds'] / ours['seconds']:6.2f}x"
        if not result["exact_peak"]:
            line += "   (peak includes input creation: clear_refs unavailable)"
        print(line)


if __name__ == "__main__":
    main()
