"""Time and extra peak memory of the distillation loss from hidden states, forward + backward
including the lm_head matmuls, on one CUDA GPU: ours (fused and unfused) against the paper
code's loss, TRL's GKD full-vocabulary JSD and Liger-Kernel's fused linear JSD, in one run.

Every variant starts from the same tensors: bf16 student and teacher final hidden states
(N, D) and two bf16 lm_head weights (V, D), the student's with gradient (the teacher is a
separate EMA head, as in training). Each variant computes its logits from them, the loss, and
the gradients of the student's hidden states and head. "Extra GiB" is
torch.cuda.max_memory_allocated during one forward + backward minus the memory allocated
before it (the inputs and both weights), so it includes the gradients every variant returns:
the (V, D) weight gradient and the (N, D) hidden gradient, printed as "grads". Time is the
median over repeats of CUDA-event time, after warm-up.

Variants (beta 0.5; top-K 256 and per-entry clip 0.05, the paper's, where the loss has them):

- ``fused-auto`` / ``fused-torch``: ``fused_topk_jsd`` (Triton student pass when it imports /
  the pure-torch one). The student's (N, V) logits never exist.
- ``unfused``: full bf16 logits ``h @ W.T`` of both, then ``generalized_jsd`` (automatic path).
- ``paper``: the paper code's loss (its public repository, TiezMind/Visual-OPSD): full bf16 logits
  of both (teacher's under no_grad), the teacher's top-256 indices, both gathered there in
  bf16, divided by tau, float32 log-softmax over the K entries, the mixture in log space, the
  per-entry terms clamped at 0.05, summed over K, mean over tokens, times tau^2; autograd
  through all of it.
- ``trl-gkd``: the generalized JSD over the whole vocabulary as TRL's GKD trainer computes it:
  float32 log-softmax of both over V, the mixture log m = logsumexp(log s + log(1 - beta),
  log t + log beta), beta * KL(t || m) + (1 - beta) * KL(s || m) summed over V, mean over
  tokens (no top-K, no clip).
- ``liger``: ``liger_kernel``'s ``LigerFusedLinearJSD(jsd_beta=0.5)`` when it imports (its own
  full-vocabulary JSD, chunked over rows); skipped with a note otherwise.
- ``liger-chunked``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (compiled, chunks of
  1024 rows), its hard-label term weighted 0 so only the JSD remains.
- ``dense-floor``: only the matmuls any logits-based loss pays: the student head forward and
  backward (both gradients) and the teacher head forward.

Usage (needs a CUDA GPU; bf16 inputs of the default shapes take about 1 GiB)::

    python benchmarks/bench_loss.py                       # N in {4096, 8192}, D 3584, V 152064
    python benchmarks/bench_loss.py --rows 4096 --repeats 10 --out loss.json
    python benchmarks/bench_loss.py --variants fused-auto,paper --rows 8192
    python benchmarks/bench_loss.py --variants fused-auto --rows 8192 --profile   # kernel breakdown
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

GIB = 1024**3
BETA, TOP_K, CLIP, TAU = 0.5, 256, 0.05, 1.0
VARIANTS = ("fused-auto", "fused-torch", "unfused", "paper", "trl-gkd", "liger", "liger-chunked", "dense-floor")


def _fused(impl):
    from opsd_core.divergences import fused_topk_jsd

    def loss(student, teacher, weight, teacher_weight):
        return fused_topk_jsd(
            student, teacher, weight, teacher_weight=teacher_weight, beta=BETA, top_k=TOP_K, clip=CLIP, impl=impl
        )

    return loss


def _unfused(student, teacher, weight, teacher_weight):
    from opsd_core.divergences import generalized_jsd

    student_logits = student @ weight.T  # (N, V)
    with torch.no_grad():
        teacher_logits = teacher @ teacher_weight.T  # (N, V)
    return generalized_jsd(student_logits, teacher_logits, beta=BETA, top_k=TOP_K, clip=CLIP)


def _log_mixture(log_s, log_t, beta):
    return torch.logsumexp(torch.stack([log_s + math.log(1 - beta), log_t + math.log(beta)]), dim=0)


def _paper(student, teacher, weight, teacher_weight):
    student_logits = student @ weight.T  # (N, V) bf16
    with torch.no_grad():
        teacher_logits = teacher @ teacher_weight.T  # (N, V) bf16
        support = teacher_logits.topk(TOP_K, dim=-1).indices  # (N, K)
    student_k = student_logits.gather(-1, support)  # (N, K) bf16
    teacher_k = teacher_logits.gather(-1, support)
    log_s = torch.log_softmax((student_k / TAU).float(), dim=-1)
    log_t = torch.log_softmax((teacher_k / TAU).float(), dim=-1)
    log_m = _log_mixture(log_s, log_t, BETA)
    terms = BETA * log_t.exp() * (log_t - log_m) + (1 - BETA) * log_s.exp() * (log_s - log_m)  # (N, K)
    return terms.clamp(max=CLIP).sum(dim=-1).mean() * TAU**2


def _trl_gkd(student, teacher, weight, teacher_weight):
    student_logits = student @ weight.T  # (N, V)
    with torch.no_grad():
        teacher_logits = teacher @ teacher_weight.T  # (N, V)
    log_s = torch.log_softmax(student_logits.float() / TAU, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / TAU, dim=-1)
    log_m = _log_mixture(log_s, log_t, BETA)
    kl_teacher = (log_t.exp() * (log_t - log_m)).sum(dim=-1)
    kl_student = (log_s.exp() * (log_s - log_m)).sum(dim=-1)
    return (BETA * kl_teacher + (1 - BETA) * kl_student).mean()


def _liger():
    from liger_kernel.transformers import LigerFusedLinearJSD

    module = LigerFusedLinearJSD(jsd_beta=BETA, temperature=TAU)

    def loss(student, teacher, weight, teacher_weight):
        return module(student, weight, teacher, teacher_weight, None)  # no labels: every row counts

    return loss


def _liger_chunked():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    module = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, temperature=TAU, compiled=True)

    def loss(student, teacher, weight, teacher_weight):
        labels = torch.zeros(student.shape[0], dtype=torch.long, device=student.device)  # hard loss weighted 0
        return module(student, weight, teacher, teacher_weight, labels)

    return loss


def _dense_floor(student, teacher, weight, teacher_weight):
    student_logits = student @ weight.T  # (N, V)
    with torch.no_grad():
        _ = teacher @ teacher_weight.T  # (N, V): paid, then dropped
    student_logits.backward(torch.ones_like(student_logits))


def _variant(name):
    """The loss callable of a variant, or a string saying why it cannot run here."""
    if name == "fused-auto":
        return _fused("auto")
    if name == "fused-torch":
        return _fused("torch")
    if name in ("liger", "liger-chunked"):
        try:
            return _liger() if name == "liger" else _liger_chunked()
        except ImportError as error:
            return f"liger_kernel does not import ({error})"
    return {"unfused": _unfused, "paper": _paper, "trl-gkd": _trl_gkd, "dense-floor": _dense_floor}[name]


def _step(loss_fn, inputs):
    student, teacher, weight, teacher_weight = inputs
    student.grad = weight.grad = None
    loss = loss_fn(student, teacher, weight, teacher_weight)
    if loss is not None:
        loss.backward()


def _measure(loss_fn, inputs, warmup, repeats):
    """(median ms, extra peak GiB) of forward + backward."""
    for _ in range(warmup):
        _step(loss_fn, inputs)
    for tensor in inputs:
        tensor.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(loss_fn, inputs)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / GIB
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _step(loss_fn, inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), extra


def _profile(name, loss_fn, inputs):
    """Print the CUDA kernels of one forward + backward, most time first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        _step(loss_fn, inputs)
        torch.cuda.synchronize()
    print(f"\n# kernels of one {name} step\n" + trace.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)


def _inputs(rows, hidden, vocab, seed):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    kwargs = {"device": "cuda", "dtype": torch.bfloat16, "generator": generator}
    student = torch.randn(rows, hidden, **kwargs).requires_grad_()
    teacher = torch.randn(rows, hidden, **kwargs)
    # Scaled so logits have a spread of a few nats, like a trained head's.
    weight = (torch.randn(vocab, hidden, **kwargs) * (3.0 / math.sqrt(hidden))).requires_grad_()
    teacher_weight = (weight.detach() + 0.1 * torch.randn(vocab, hidden, **kwargs) / math.sqrt(hidden)).contiguous()
    return student, teacher, weight, teacher_weight


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 8192], help="N values (tokens)")
    parser.add_argument("--hidden", type=int, default=3584, help="D (Qwen2.5-7B: 3584)")
    parser.add_argument("--vocab", type=int, default=152_064, help="V (Qwen2.5-7B: 152,064)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--profile", action="store_true", help="also print the CUDA kernels of one step of each variant at the largest N")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_loss.py needs a CUDA GPU", file=sys.stderr)
        return 2
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, D={args.hidden}, V={args.vocab}, bf16")
    results = []
    for rows in args.rows:
        inputs = _inputs(rows, args.hidden, args.vocab, args.seed)
        grads = (inputs[2].numel() + inputs[0].numel()) * 2 / GIB
        print(f"\nN={rows}: grads of the student head and hidden states (in every variant's extra): {grads:.2f} GiB")
        for name in names:
            loss_fn = _variant(name)
            record = {"impl": name, "rows": rows, "hidden": args.hidden, "vocab": args.vocab}
            if isinstance(loss_fn, str):
                print(f"  skipping {name}: {loss_fn}")
                record["skipped"] = loss_fn
            else:
                try:
                    record["ms"], record["extra_gib"] = _measure(loss_fn, inputs, args.warmup, args.repeats)
                except torch.cuda.OutOfMemoryError:
                    record["error"] = "OOM"
                except Exception as error:  # noqa: BLE001 -- one variant's failure must not lose the others' figures
                    record["error"] = f"{type(error).__name__}: {error}"
                if args.profile and rows == max(args.rows) and "ms" in record:
                    _profile(name, loss_fn, inputs)
                for tensor in inputs:
                    tensor.grad = None
                torch.cuda.empty_cache()
            results.append(record)
        del inputs
        torch.cuda.empty_cache()
    _print_table(results)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, handle, indent=2)
    return 0


def _print_table(results):
    paper = {r["rows"]: r for r in results if r["impl"] == "paper" and "ms" in r}
    print("\n| impl | N | ms | extra GiB | ms vs paper | GiB vs paper |")
    print("|---|---|---|---|---|---|")
    for record in results:
        if "skipped" in record:
            continue
        if "ms" not in record:
            print(f"| {record['impl']} | {record['rows']} | {record['error']} | {record['error']} | | |")
            continue
        base = paper.get(record["rows"])
        ms_ratio = f"{record['ms'] / base['ms']:.2f}x" if base else "n/a"
        gib_ratio = f"{record['extra_gib'] / base['extra_gib']:.2f}x" if base and base["extra_gib"] > 0 else "n/a"
        print(
            f"| {record['impl']} | {record['rows']} | {record['ms']:.1f} | {record['extra_gib']:.2f} | {ms_ratio} | {gib_ratio} |"
        )


if __name__ == "__main__":
    sys.exit(main())
