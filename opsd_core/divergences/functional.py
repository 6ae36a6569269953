"""Divergences between student and teacher next-token distributions, as plain functions.

Owns: the numerics of the generalized JSD_beta and forward/reverse KL over logits rows:
temperature (with tau^2 scaling), the teacher's top-K support with renormalisation, per-entry
or per-row clipping, masks, reductions, and a row-chunked autograd path whose extra memory
does not grow with the number of rows.
Does not know: images, backends or contexts; it sees logits and a mask, nothing else.

Shapes: logits are (..., V); a mask is bool (...); K is top_k.
"""

from __future__ import annotations

import math

import torch

_REDUCTIONS = ("none", "sum", "mean")
_CLIP_MODES = ("entry", "token")
_DIRECTIONS = ("forward", "reverse")
# Above this many float32 elements of working width (rows x V, or rows x K with top-K), rows are
# processed in chunks of about this size, and the backward pass recomputes each chunk: the row
# computation holds a handful of such buffers at once.
_CHUNK_ELEMENTS = 1 << 24


def _row_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str,
    beta: float,
    top_k: int | None,
    clip: float | None,
    clip_mode: str,
    temperature: float,
) -> torch.Tensor:
    """float (R,) divergence of each row of (R, V) logits; differentiable in ``student``.

    ``kind`` is "jsd", "forward" (KL(p_T || p_S)) or "reverse" (KL(p_S || p_T)).
    """
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    teacher = teacher.detach()
    if top_k is not None and top_k < student.shape[-1]:
        support = teacher.topk(top_k, dim=-1).indices  # (R, K)
        teacher = teacher.gather(-1, support)  # (R, K)
        student = student.gather(-1, support)  # (R, K)
    log_s = torch.log_softmax(student.to(compute) / temperature, dim=-1)
    log_t = torch.log_softmax(teacher.to(compute) / temperature, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    elif kind == "jsd" and beta == 1.0:
        kind = "reverse"
    if kind == "forward":
        terms = _plogp_ratio(log_t, log_s)
    elif kind == "reverse":
        terms = _plogp_ratio(log_s, log_t)
    else:
        log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
        terms = beta * _plogp_ratio(log_t, log_m) + (1.0 - beta) * _plogp_ratio(log_s, log_m)
    if clip is not None and clip_mode == "entry":
        terms = terms.clamp(max=clip)
    rows = terms.sum(dim=-1)
    if clip is not None and clip_mode == "token":
        rows = rows.clamp(max=clip)
    return rows * temperature**2


def _plogp_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log q), with 0 where p = 0 (so -inf logits are harmless)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


class _ChunkedRows(torch.autograd.Function):
    """Row losses computed ``chunk`` rows at a time; backward recomputes each chunk and writes
    its gradient into one preallocated tensor of the input's dtype, so no float32 copy of the
    whole (N, V) input is ever held."""

    @staticmethod
    def forward(ctx, student, teacher, chunk, options):
        ctx.save_for_backward(student, teacher)
        ctx.chunk, ctx.options = chunk, options
        rows = [
            _row_losses(student[i : i + chunk], teacher[i : i + chunk], **options)
            for i in range(0, student.shape[0], chunk)
        ]
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        return torch.cat(rows) if rows else student.new_zeros(0, dtype=dtype)

    @staticmethod
    def backward(ctx, grad_rows):
        student, teacher = ctx.saved_tensors
        grad = torch.empty_like(student)
        for i in range(0, student.shape[0], ctx.chunk):
            piece = student[i : i + ctx.chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                rows = _row_losses(piece, teacher[i : i + ctx.chunk], **ctx.options)
            (grad[i : i + ctx.chunk],) = torch.autograd.grad(rows, piece, grad_rows[i : i + ctx.chunk].to(rows.dtype))
        return grad, None, None, None


def _check(student, teacher, mask, top_k, temperature, reduction, chunk_size) -> None:
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise ValueError("student_logits and teacher_logits must be tensors")
    if not student.is_floating_point() or not teacher.is_floating_point():
        raise ValueError(
            f"student_logits and teacher_logits must be floating point, got {student.dtype} and {teacher.dtype}"
        )
    if student.dim() < 1 or student.shape != teacher.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape (..., V), got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    vocabulary = student.shape[-1]
    if vocabulary < 1:
        raise ValueError("student_logits: the vocabulary dimension V must be at least 1")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != student.shape[:-1]:
            got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape {tuple(student.shape[:-1])}, got {got}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocabulary):
        raise ValueError(f"top_k must be an integer in [1, {vocabulary}] or None, got {top_k!r}")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _divergence(student, teacher, mask, reduction, chunk_size, options) -> torch.Tensor:
    batch_shape, vocabulary = student.shape[:-1], student.shape[-1]
    flat_student = student.reshape(-1, vocabulary)  # (N, V)
    flat_teacher = teacher.detach().reshape(-1, vocabulary)  # (N, V)
    top_k = options["top_k"]
    width = top_k if top_k is not None and top_k < vocabulary else vocabulary
    if chunk_size is None and flat_student.shape[0] * width <= _CHUNK_ELEMENTS:
        # Small enough (e.g. any top-K over the teacher's K entries): plain autograd, no recompute.
        rows = _row_losses(flat_student, flat_teacher, **options)  # (N,)
    else:
        chunk = chunk_size or max(1, _CHUNK_ELEMENTS // vocabulary)
        rows = _ChunkedRows.apply(flat_student, flat_teacher, chunk, options)  # (N,)
    if mask is not None:
        valid = mask.reshape(-1)
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        count = valid.sum()
    else:
        count = torch.tensor(rows.shape[0], device=rows.device)
    if reduction == "none":
        return rows.reshape(batch_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / count.clamp(min=1).to(total.dtype)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    top_k: int | None = None,
    clip: float | None = None,
    clip_mode: str = "entry",
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence JSD_beta per row of logits.

    With p_T = softmax(teacher / tau), p_S = softmax(student / tau) and
    m = beta * p_T + (1 - beta) * p_S, a row's loss is
    beta * KL(p_T || m) + (1 - beta) * KL(p_S || m), times tau^2. beta = 0 is exactly forward
    KL(p_T || p_S), beta = 1 exactly reverse KL(p_S || p_T).

    Args:
        student_logits: float (..., V); gradients flow into it.
        teacher_logits: float (..., V); detached, never receives gradient.
        beta: mixture weight in [0, 1].
        top_k: restrict both distributions to the teacher's K largest logits per row and
            renormalise over them (student logits outside get no gradient); None = all of V.
        clip: cap (> 0) on each vocabulary entry's term ("entry") or on the row sum ("token");
            capped terms pass no gradient.
        clip_mode: "entry" or "token".
        temperature: tau > 0.
        mask: bool (...), the rows that count.
        reduction: "none" -> (...) with masked rows 0; "sum" over valid rows; "mean" over
            valid rows (0 when none is valid).
        chunk_size: rows processed at a time (None: sized from V to bound memory).

    Returns:
        float32 (float64 for float64 inputs), shape (...) or a scalar.
    """
    _check(student_logits, teacher_logits, mask, top_k, temperature, reduction, chunk_size)
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if clip is not None and (not isinstance(clip, (int, float)) or not clip > 0):
        raise ValueError(f"clip must be > 0 or None, got {clip!r}")
    if clip_mode not in _CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {_CLIP_MODES}, got {clip_mode!r}")
    options = dict(
        kind="jsd", beta=float(beta), top_k=top_k, clip=clip, clip_mode=clip_mode, temperature=float(temperature)
    )
    return _divergence(student_logits, teacher_logits, mask, reduction, chunk_size, options)


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    direction: str = "forward",
    top_k: int | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KL divergence per row of logits: "forward" = KL(p_T || p_S), "reverse" = KL(p_S || p_T).

    Same conventions as :func:`generalized_jsd` (temperature with tau^2 scaling, teacher
    top-K support, mask, reductions, chunking, no gradient into the teacher).
    """
    _check(student_logits, teacher_logits, mask, top_k, temperature, reduction, chunk_size)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    options = dict(kind=direction, beta=0.0, top_k=top_k, clip=None, clip_mode="entry", temperature=float(temperature))
    return _divergence(student_logits, teacher_logits, mask, reduction, chunk_size, options)
