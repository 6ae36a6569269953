"""Triton kernels of the fused top-K JSD's student pass (CUDA only).

Owns: three kernels over a support of K lm_head rows per token: the gather-dot forward
(logits[n, k] = hidden[n] . weight[support[n, k]]), the hidden gradient
(sum_k grad[n, k] * weight[support[n, k]]) and the weight gradient (for each vocabulary row,
the sum of grad[n, k] * hidden[n] over the entries whose support holds it, the entries sorted
by row first). The forward and hidden-gradient programs read their K x D weight tile straight
from the gathered rows, so no (N, K, D) copy exists, and every product accumulates in float32
whatever the input dtype.
Does not know: the loss, the teacher pass or autograd (:mod:`.fused` wraps these); tensors
arrive contiguous-able on one CUDA device, in float16, bfloat16 or float32.

Letters: N' rows, K support size, D hidden size, U used vocabulary rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Block sizes measured on an H200 at N = 8192, K = 256, D = 3584, V = 152,064 (bf16, 4 warps):
# the two gradient kernels read 512 / 1024 contiguous features of a row per load (3.5 and
# 3.8 ms against 9.2 and 21 ms with 128).
_BLOCK_K = 32  # forward: support entries per program
_BLOCK_D = 128  # forward: features per iteration
_GRAD_HIDDEN_BLOCK_K, _GRAD_HIDDEN_BLOCK_D = 64, 512
_GRAD_WEIGHT_BLOCK_E, _GRAD_WEIGHT_BLOCK_D = 8, 1024


@triton.jit
def _gather_dot_kernel(hidden_ptr, weight_ptr, support_ptr, out_ptr, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    index = tl.load(support_ptr + row * K + ks, mask=k_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        ds = start + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(hidden_ptr + row * D + ds, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + index[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    tl.store(out_ptr + row * K + ks, acc.to(out_ptr.dtype.element_ty), mask=k_ok)


@triton.jit
def _grad_hidden_kernel(grad_ptr, weight_ptr, support_ptr, out_ptr, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        index = tl.load(support_ptr + row * K + ks, mask=k_ok, other=0).to(tl.int64)
        g = tl.load(grad_ptr + row * K + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + index[:, None] * D + ds[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(g[:, None] * w.to(tl.float32), axis=0)
    tl.store(out_ptr + row * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _grad_weight_kernel(
    grad_ptr, hidden_ptr, order_ptr, starts_ptr, rows_ptr, out_ptr, K, D, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr
):
    # Program (u, d-block): vocabulary row rows[u], whose support entries are
    # order[starts[u]:starts[u + 1]] (flat n * K + k); sums grad * hidden over them in float32.
    used = tl.program_id(0).to(tl.int64)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    first = tl.load(starts_ptr + used)
    last = tl.load(starts_ptr + used + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(first, last, BLOCK_E):
        es = start + tl.arange(0, BLOCK_E)
        e_ok = es < last
        entry = tl.load(order_ptr + es, mask=e_ok, other=0).to(tl.int64)
        g = tl.load(grad_ptr + entry, mask=e_ok, other=0.0).to(tl.float32)
        n = entry // K
        h = tl.load(hidden_ptr + n[:, None] * D + ds[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(g[:, None] * h.to(tl.float32), axis=0)
    row = tl.load(rows_ptr + used).to(tl.int64)
    tl.store(out_ptr + row * D + ds, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


def gathered_logits(hidden: torch.Tensor, weight: torch.Tensor, support: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dtype`` (N', K) logits at the support from float (N', D) hidden and (V, D) weight."""
    hidden, weight, support = hidden.contiguous(), weight.contiguous(), support.contiguous()
    rows, top_k = support.shape
    out = torch.empty(rows, top_k, dtype=dtype, device=hidden.device)
    if rows:
        grid = (rows, triton.cdiv(top_k, _BLOCK_K))
        _gather_dot_kernel[grid](hidden, weight, support, out, top_k, hidden.shape[1], BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)
    return out


def gathered_logits_grad_hidden(
    grad: torch.Tensor, weight: torch.Tensor, support: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``dtype`` (N', D) = sum_k grad[n, k] * weight[support[n, k]] for float (N', K) ``grad``."""
    grad, weight, support = grad.contiguous(), weight.contiguous(), support.contiguous()
    rows, hidden_size = support.shape[0], weight.shape[1]
    out = torch.empty(rows, hidden_size, dtype=dtype, device=grad.device)
    if rows:
        grid = (rows, triton.cdiv(hidden_size, _GRAD_HIDDEN_BLOCK_D))
        _grad_hidden_kernel[grid](
            grad, weight, support, out, support.shape[1], hidden_size,
            BLOCK_K=_GRAD_HIDDEN_BLOCK_K, BLOCK_D=_GRAD_HIDDEN_BLOCK_D, num_warps=4,
        )
    return out


def gathered_logits_grad_weight(
    grad: torch.Tensor, hidden: torch.Tensor, support: torch.Tensor, vocab: int, dtype: torch.dtype
) -> torch.Tensor:
    """``dtype`` (V, D) weight gradient: row v = sum of grad[n, k] * hidden[n] over the entries
    with support[n, k] = v, summed in float32 and rounded once; rows no support holds are 0.

    The entries are sorted by vocabulary row first, so each program owns one row (and a block
    of D) and sums its entries in registers: no atomics and no float32 (V, D) buffer.

    Args:
        grad: float (N', K).
        hidden: float (N', D).
        support: int64 (N', K) vocabulary rows.
        vocab: V.
        dtype: the gradient's dtype (the weight's).
    """
    grad, hidden = grad.contiguous(), hidden.contiguous()
    hidden_size = hidden.shape[1]
    out = torch.zeros(vocab, hidden_size, dtype=dtype, device=grad.device)
    if support.numel() == 0:
        return out
    flat = support.reshape(-1)
    ids, order = torch.sort(flat)  # (N'K,), (N'K,)
    rows, counts = torch.unique_consecutive(ids, return_counts=True)  # (U,), (U,)
    starts = torch.nn.functional.pad(counts.cumsum(0), (1, 0))  # (U + 1,)
    grid = (rows.shape[0], triton.cdiv(hidden_size, _GRAD_WEIGHT_BLOCK_D))
    _grad_weight_kernel[grid](
        grad, hidden, order, starts, rows, out, support.shape[1], hidden_size,
        BLOCK_E=_GRAD_WEIGHT_BLOCK_E, BLOCK_D=_GRAD_WEIGHT_BLOCK_D, num_warps=4,
    )
    return out
