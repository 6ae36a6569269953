"""Triton kernels of the fused top-K JSD's student pass (CUDA only).

Owns: three kernels over a support of K lm_head rows per token: the gather-dot forward
(logits[n, k] = hidden[n] . weight[support[n, k]]), the hidden gradient
(sum_k grad[n, k] * weight[support[n, k]]) and the weight gradient (grad[n, k] * hidden[n]
added atomically into a float32 accumulator over the used vocabulary rows). Each program
reads its K x D weight tile straight from the gathered rows, so no (N, K, D) copy exists and
products accumulate in float32 whatever the input dtype.
Does not know: the loss, the teacher pass or autograd (:mod:`.fused` wraps these); tensors
arrive contiguous-able on one CUDA device, in float16, bfloat16 or float32.

Letters: N' rows, K support size, D hidden size, U used vocabulary rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_K = 32
_BLOCK_D = 128


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
def _grad_weight_kernel(grad_ptr, hidden_ptr, slot_ptr, acc_ptr, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok, d_ok = ks < K, ds < D
    g = tl.load(grad_ptr + row * K + ks, mask=k_ok, other=0.0).to(tl.float32)
    h = tl.load(hidden_ptr + row * D + ds, mask=d_ok, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + row * K + ks, mask=k_ok, other=0).to(tl.int64)
    tl.atomic_add(acc_ptr + slot[:, None] * D + ds[None, :], g[:, None] * h[None, :], mask=k_ok[:, None] & d_ok[None, :])


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
        grid = (rows, triton.cdiv(hidden_size, _BLOCK_D))
        _grad_hidden_kernel[grid](grad, weight, support, out, support.shape[1], hidden_size, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)
    return out


def gathered_logits_grad_weight(
    grad: torch.Tensor, hidden: torch.Tensor, slots: torch.Tensor, accumulator: torch.Tensor
) -> None:
    """Add grad[n, k] * hidden[n] into float32 (U, D) ``accumulator`` row ``slots[n, k]``.

    Args:
        grad: float (N', K).
        hidden: float (N', D).
        slots: int64 (N', K) rows of the accumulator (the support's inverse in its unique rows).
        accumulator: float32 (U, D), updated in place.
    """
    grad, hidden, slots = grad.contiguous(), hidden.contiguous(), slots.contiguous()
    rows, top_k = slots.shape
    if rows:
        grid = (rows, triton.cdiv(top_k, _BLOCK_K), triton.cdiv(hidden.shape[1], _BLOCK_D))
        _grad_weight_kernel[grid](grad, hidden, slots, accumulator, top_k, hidden.shape[1], BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D)
