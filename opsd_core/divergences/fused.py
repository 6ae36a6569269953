"""The top-K generalized JSD straight from final hidden states: no (N, V) student logits.

Owns: ``fused_topk_jsd`` and the two passes behind it. The teacher pass multiplies blocks of
teacher rows by the teacher's lm_head, (R, V) at a time and without gradient, keeping only
each row's top-K indices and logits. The student pass then computes the student's logits at
those K entries only, as dot products of the student's hidden state with K gathered lm_head
rows, through an autograd function that stores nothing of size K x D and recomputes the
gathers blockwise in backward (the weight gradient is scattered into the gathered rows).
Because :func:`~opsd_core.divergences.functional.generalized_jsd` renormalises both
distributions over the teacher's top-K support, those (N, K) logits are all the loss needs:
no log-normaliser over V is ever formed for the student.
Does not know: the formulas, clipping and reductions of the loss itself, which it hands to
:func:`~opsd_core.divergences.functional.generalized_jsd` on the (N, K) logits; backends;
the Triton kernels (:mod:`._fused_triton`, imported only on CUDA).

Shapes: hidden states float (..., D); lm_head weights float (V, D); a mask bool (...);
N is the number of rows of (...), N' the number of valid ones, K the top-K.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from opsd_core.divergences.functional import (
    _check_chunk_size,
    _check_float_tensor,
    _check_jsd_options,
    _check_mask,
    _check_temperature_and_reduction,
    _is_int,
    generalized_jsd,
)

__all__ = ["fused_topk_jsd", "top_k_logits"]

_IMPLS = ("auto", "torch", "triton")
# Automatic blocks hold about this many elements: the teacher pass's (R, V) logits block
# (2**28 bf16 elements are 512 MiB; on an H200 at N = 8192, V = 152,064, blocks of ~1,800 rows
# take the matmul and top-K 10 % less time than blocks of ~440), and the torch student pass's
# (R, K, D) gathered weight rows (2**26).
_TEACHER_BLOCK_ELEMENTS = 1 << 28
_BLOCK_ELEMENTS = 1 << 26


def _check_tensors(student_hidden, teacher_hidden, weight, teacher_weight, mask, top_k, chunk_size, impl) -> None:
    tensors = (
        ("student_hidden", student_hidden),
        ("teacher_hidden", teacher_hidden),
        ("weight", weight),
        ("teacher_weight", teacher_weight),
    )
    for name, tensor in tensors:
        if name == "teacher_weight" and tensor is None:
            continue
        _check_float_tensor(name, tensor)
        if tensor.device != student_hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but student_hidden is on {student_hidden.device}")
    if student_hidden.dim() < 1 or student_hidden.shape[-1] < 1:
        raise ValueError(f"student_hidden must have shape (..., D) with D >= 1, got {tuple(student_hidden.shape)}")
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(
            f"teacher_hidden must have the same shape as student_hidden, got {tuple(teacher_hidden.shape)} "
            f"and {tuple(student_hidden.shape)}"
        )
    hidden = student_hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] != hidden:
        raise ValueError(f"weight must have shape (V, D) = (V, {hidden}) with V >= 1, got {tuple(weight.shape)}")
    if teacher_weight is not None and teacher_weight.shape != weight.shape:
        raise ValueError(
            f"teacher_weight must have the same shape as weight, got {tuple(teacher_weight.shape)} "
            f"and {tuple(weight.shape)}"
        )
    batch_shape, vocab = tuple(student_hidden.shape[:-1]), weight.shape[0]
    _check_mask(mask, batch_shape, student_hidden.device, "student_hidden", "the hidden states without D")
    if not (_is_int(top_k) and 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be an integer in [1, V] = [1, {vocab}] (required here), got {top_k!r}")
    _check_chunk_size(chunk_size)
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {', '.join(_IMPLS)}, got {impl!r}")
    if impl == "triton" and not student_hidden.is_cuda:
        raise ValueError(f"impl='triton' needs CUDA tensors, but student_hidden is on {student_hidden.device}")


def _check_loss(beta, clip, clip_mode, temperature, reduction) -> None:
    # The same checks and messages as generalized_jsd, made before any matmul runs.
    _check_jsd_options(beta, clip, clip_mode)
    _check_temperature_and_reduction(temperature, reduction)


def _use_triton(impl: str, hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    if impl == "torch" or not hidden.is_cuda:
        return False
    if torch.float64 in (hidden.dtype, weight.dtype):
        # The kernels accumulate in float32; float64 inputs keep their precision on the torch path.
        if impl == "triton":
            raise ValueError("impl='triton' computes in float32 and takes no float64 inputs; use impl='torch'")
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        if impl == "triton":
            raise ValueError("impl='triton' needs the triton package, which does not import here") from None
        return False
    return True


@torch.no_grad()
def _teacher_top_k(
    hidden: torch.Tensor, weight: torch.Tensor, top_k: int, block_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (N', K) indices and float (N', K) logits of each row's K largest teacher logits.

    Args:
        hidden: float (N', D) teacher hidden states.
        weight: float (V, D) teacher lm_head weight.
        top_k: K.
        block_rows: rows whose (rows, V) logits exist at once.
    """
    rows = hidden.shape[0]
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # Cast the head once, not once per block as autocast would (it caches no detached casts).
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.result_type(hidden, weight)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    indices = torch.empty(rows, top_k, dtype=torch.long, device=hidden.device)
    values = torch.empty(rows, top_k, dtype=dtype, device=hidden.device)
    for start in range(0, rows, block_rows):
        block = slice(start, start + block_rows)
        logits = hidden[block] @ weight.T  # (R, V)
        # Same call as the unfused path's support (unsorted topk), so ties break the same way.
        found = logits.topk(top_k, dim=-1, sorted=False)
        values[block], indices[block] = found.values, found.indices
        del logits, found
    return indices, values


def _gathered_logits_torch(hidden: torch.Tensor, weight: torch.Tensor, support: torch.Tensor, block_rows: int):
    """float (N', K) = sum_d hidden[n, d] * weight[support[n, k], d], blockwise."""
    dtype = torch.result_type(hidden, weight)
    out = torch.empty(support.shape, dtype=dtype, device=hidden.device)
    for start in range(0, hidden.shape[0], block_rows):
        block = slice(start, start + block_rows)
        rows = weight[support[block]].to(dtype)  # (R, K, D)
        out[block] = torch.einsum("rd,rkd->rk", hidden[block].to(dtype), rows)
    return out


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _GatheredLogits(torch.autograd.Function):
    """Student logits at the support, float (N', K), from hidden (N', D) and weight (V, D).

    Backward recomputes the gathers a block at a time. The weight gradient is summed in
    float32 (float64 for float64 weights) and rounded once into a zero (V, D) gradient of the
    weight's dtype, so a bf16 weight's many per-token contributions do not round one by one:
    on the torch path in a (U, D) buffer over the U <= min(V, N' * K) vocabulary rows some
    support holds, in the Triton kernel in registers, one vocabulary row per program.
    """

    @staticmethod
    def forward(ctx, hidden, weight, support, block_rows, triton):
        ctx.save_for_backward(hidden, weight, support)
        ctx.block_rows, ctx.triton = block_rows, triton
        if triton:
            from opsd_core.divergences import _fused_triton

            return _fused_triton.gathered_logits(hidden, weight, support, torch.result_type(hidden, weight))
        return _gathered_logits_torch(hidden, weight, support, block_rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logits):
        hidden, weight, support = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = grad_weight = None
        grad_logits = grad_logits.contiguous()
        if ctx.triton:
            from opsd_core.divergences import _fused_triton

            if want_hidden:
                grad_hidden = _fused_triton.gathered_logits_grad_hidden(grad_logits, weight, support, hidden.dtype)
            if want_weight:
                grad_weight = _fused_triton.gathered_logits_grad_weight(
                    grad_logits, hidden, support, weight.shape[0], weight.dtype
                )
            return grad_hidden, grad_weight, None, None, None
        if want_hidden:
            grad_hidden = torch.empty_like(hidden)
        if want_weight:
            used, inverse = torch.unique(support, return_inverse=True)  # (U,), (N', K)
            accumulator = torch.zeros(
                used.shape[0], weight.shape[1], dtype=_accumulation_dtype(weight.dtype), device=weight.device
            )  # (U, D)
        for start in range(0, hidden.shape[0], ctx.block_rows):
            block = slice(start, start + ctx.block_rows)
            grad = grad_logits[block]  # (R, K)
            if want_hidden:
                rows = weight[support[block]]  # (R, K, D)
                grad_hidden[block] = torch.einsum("rk,rkd->rd", grad.to(rows.dtype), rows).to(hidden.dtype)
                del rows
            if want_weight:
                outer = grad.to(accumulator.dtype).unsqueeze(-1) * hidden[block].to(accumulator.dtype).unsqueeze(1)
                accumulator.index_add_(0, inverse[block].reshape(-1), outer.reshape(-1, weight.shape[1]))
                del outer
        if want_weight:
            grad_weight = torch.zeros_like(weight).index_copy_(0, used, accumulator.to(weight.dtype))
        return grad_hidden, grad_weight, None, None, None


def top_k_logits(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    top_k: int,
    mask: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student and teacher logits at each valid row's teacher top-K entries, from hidden states.

    Args:
        student_hidden: float (..., D); gradients flow into it.
        teacher_hidden: float (..., D); never receives gradient.
        weight: float (V, D) student lm_head weight; gradients flow into it.
        top_k: K in [1, V].
        mask: bool (...), the rows that count; None: all rows.
        teacher_weight: float (V, D) teacher lm_head weight (default ``weight``); never
            receives gradient.
        chunk_size: rows per block in both passes; None sizes blocks automatically.
        impl: "torch", "triton" (CUDA only) or "auto" (Triton on CUDA when it imports).

    Returns:
        float (N', K) student logits (differentiable), float (N', K) teacher logits
        (detached), both in the dtype ``hidden @ weight.T`` would have, and int64 (N',) the
        indices of the valid rows among the N rows of (...). The K entries of a row are the
        teacher's K largest logits in ``torch.topk`` order (unsorted).

    Raises:
        ValueError: an argument is invalid; the message names it.
    """
    _check_tensors(student_hidden, teacher_hidden, weight, teacher_weight, mask, top_k, chunk_size, impl)
    return _top_k_logits(student_hidden, teacher_hidden, weight, top_k, mask, teacher_weight, chunk_size, impl)


def _top_k_logits(student_hidden, teacher_hidden, weight, top_k, mask, teacher_weight, chunk_size, impl):
    """:func:`top_k_logits` on checked arguments."""
    hidden_size, vocab = student_hidden.shape[-1], weight.shape[0]
    student = student_hidden.reshape(-1, hidden_size)  # (N, D)
    teacher = teacher_hidden.detach().reshape(-1, hidden_size)  # (N, D)
    teacher_weight = (weight if teacher_weight is None else teacher_weight).detach()
    if mask is None:
        keep = torch.arange(student.shape[0], device=student.device)  # (N,)
    else:
        keep = mask.reshape(-1).nonzero().squeeze(-1)  # (N',)
        # Masked rows are dropped before any product, so garbage in them reaches nothing.
        student, teacher = student.index_select(0, keep), teacher.index_select(0, keep)  # (N', D)
    teacher_rows = chunk_size or max(1, _TEACHER_BLOCK_ELEMENTS // vocab)
    student_rows = chunk_size or max(1, _BLOCK_ELEMENTS // (top_k * hidden_size))
    support, teacher_logits = _teacher_top_k(teacher, teacher_weight, int(top_k), teacher_rows)  # (N', K)
    triton = _use_triton(impl, student, weight)
    student_logits = _GatheredLogits.apply(student.contiguous(), weight, support, student_rows, triton)  # (N', K)
    return student_logits, teacher_logits, keep


def fused_topk_jsd(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    beta: float,
    top_k: int,
    clip: float | None = None,
    clip_mode: str = "entry",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    teacher_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Generalized JSD_beta over the teacher's top-K, computed from hidden states.

    Equal to ``generalized_jsd(student_hidden @ weight.T, teacher_hidden @ teacher_weight.T,
    beta=..., top_k=..., clip=..., clip_mode=..., temperature=..., mask=..., reduction=...)``,
    with the same support (the teacher's K largest logits per row, ties broken by
    ``torch.topk`` as there), the same renormalisation of both distributions over that
    support (so the student's probability mass outside it is never needed), the same clip
    modes, tau, masks and reductions; it never forms the student's (N, V) logits. The
    teacher's logits exist only in blocks of rows, without gradient.

    Args:
        student_hidden: float (..., D) final hidden states (the lm_head's input); gradients
            flow into it.
        teacher_hidden: float (..., D); never receives gradient.
        weight: float (V, D) the student's lm_head weight; gradients flow into it, only at the
            rows some valid row's support holds.
        beta: mixture weight in [0, 1]; 0 is forward KL(p_T || p_S), 1 reverse KL(p_S || p_T).
        top_k: K in [1, V], required.
        clip, clip_mode, temperature: as in
            :func:`~opsd_core.divergences.functional.generalized_jsd`.
        mask: bool (...), the rows that count; None: all rows.
        reduction: "none" -> (...) with masked rows 0; "sum" over valid rows; "mean" over
            valid rows (0 when none is valid).
        teacher_weight: float (V, D) the teacher's lm_head weight; None uses ``weight``
            (detached for the teacher). Never receives gradient.
        chunk_size: rows per block of both passes; None sizes blocks to about 2**28 elements
            of (R, V) teacher logits and 2**26 of (R, K, D) gathered weight rows (torch path).
        impl: "torch", "triton" (CUDA only) or "auto" (Triton on CUDA when it imports,
            else torch).

    Returns:
        float32 ((...) or a scalar); float64 when an input is float64.

    Raises:
        ValueError: an argument is invalid; the message names it.
    """
    _check_tensors(student_hidden, teacher_hidden, weight, teacher_weight, mask, top_k, chunk_size, impl)
    _check_loss(beta, clip, clip_mode, temperature, reduction)
    student_logits, teacher_logits, keep = _top_k_logits(
        student_hidden, teacher_hidden, weight, top_k, mask, teacher_weight, chunk_size, impl
    )  # (N', K), (N', K), (N',)
    kept = generalized_jsd(
        student_logits,
        teacher_logits,
        beta=beta,
        top_k=None,
        clip=clip,
        clip_mode=clip_mode,
        temperature=temperature,
        reduction="none",
    )  # (N',)
    batch_shape = student_hidden.shape[:-1]
    rows = math.prod(batch_shape)
    losses = torch.zeros(rows, dtype=kept.dtype, device=kept.device).index_copy(0, keep, kept)  # (N,)
    if reduction == "none":
        return losses.reshape(batch_shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / max(keep.numel(), 1)
