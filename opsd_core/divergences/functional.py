"""The public functional API: ``generalized_jsd`` and ``kl_divergence`` over logits.

Owns: argument checking (every bad argument is a ValueError naming it), the compute dtype,
flattening (..., V) to rows, the choice between the plain autograd path and the chunked
path, masks, and reductions.
Does not know: images, backends or contexts (it sees logits and a mask, nothing else), and
not the formulas either (:mod:`._rows`) or the blocking (:mod:`._chunked`).

Shapes: logits are float (..., V); a mask is bool (...); N is the number of rows of (...).
"""

from __future__ import annotations

import math
import numbers

import torch

from opsd_core.divergences._chunked import ChunkedRowLosses
from opsd_core.divergences._rows import RowSpec, narrow, row_losses, top_k_support

__all__ = ["fit_top_k", "generalized_jsd", "kl_divergence"]

_REDUCTIONS = ("none", "sum", "mean")
_CLIP_MODES = ("entry", "token")
_DIRECTIONS = ("forward", "reverse")
# Above N x V = 2**23 the automatic choice is the chunked path, even with top-K: autograd's
# own gather backward would allocate float32 (N, V) buffers. Its blocks hold 2**23 working
# elements (K, or V without top-K, per row): 32 MiB per float32 buffer, fewer than ten
# buffers alive at once, so the extra memory stays well below 1 GiB at any N and V.
_BLOCK_ELEMENTS = 1 << 23


def fit_top_k(top_k: int | None, vocab: int) -> int | None:
    """A configured top-K for a model of ``vocab`` entries: K >= V means the whole vocabulary.

    Registered divergences use it so that one config (the paper's K = 256) also runs on
    models whose vocabulary is smaller than K.
    """
    return None if top_k is None or top_k >= vocab else top_k


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_float_tensor(name: str, tensor: object) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must have a floating point dtype, got {tensor.dtype}")


def _check_chunk_size(chunk_size: object) -> None:
    if chunk_size is not None and not (_is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None (automatic), got {chunk_size!r}")


def _check_common(student, teacher, mask, top_k, temperature, reduction, chunk_size) -> None:
    for name, logits in (("student_logits", student), ("teacher_logits", teacher)):
        _check_float_tensor(name, logits)
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits must have the same shape as student_logits, got {tuple(teacher.shape)} "
            f"and {tuple(student.shape)}"
        )
    if teacher.device != student.device:
        raise ValueError(f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")
    batch_shape, vocab = tuple(student.shape[:-1]), student.shape[-1]
    _check_mask(mask, batch_shape, student.device, "student_logits", "the logits without V")
    if top_k is not None and not _is_int(top_k):
        raise ValueError(f"top_k must be an integer in [1, V] or None, got {top_k!r}")
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, V] = [1, {vocab}] or None, got {top_k}")
    _check_temperature_and_reduction(temperature, reduction)
    _check_chunk_size(chunk_size)


def _check_mask(mask, batch_shape: tuple, device: torch.device, reference: str, without: str) -> None:
    """A mask is None or bool with the rows' shape ``batch_shape`` on the ``reference`` input's device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape {batch_shape}, got {got}")
    if tuple(mask.shape) != batch_shape:
        raise ValueError(f"mask must have shape {batch_shape} ({without}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but {reference} is on {device}")


def _check_temperature_and_reduction(temperature, reduction) -> None:
    if not (_is_real(temperature) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")


def _check_jsd_options(beta, clip, clip_mode) -> None:
    if not (_is_real(beta) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if clip is not None and not (_is_real(clip) and clip > 0):
        raise ValueError(f"clip must be a number > 0 or None, got {clip!r}")
    if clip_mode not in _CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {', '.join(_CLIP_MODES)}, got {clip_mode!r}")


def _divergence(student, teacher, mask, top_k, reduction, chunk_size, spec: RowSpec) -> torch.Tensor:
    """Row losses of float (..., V) logits under a bool (...) mask (or None), reduced.

    Returns float (...) for reduction "none", else a scalar, in ``spec.compute_dtype``.
    """
    batch_shape, vocab = student.shape[:-1], student.shape[-1]
    student = student.reshape(-1, vocab)  # (N, V)
    teacher = teacher.detach().reshape(-1, vocab)  # (N, V)
    valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device) if mask is None else mask.reshape(-1)
    top_k = None if top_k is None or top_k == vocab else int(top_k)
    if chunk_size is None and student.shape[0] * vocab <= _BLOCK_ELEMENTS:
        # Plain autograd: cheapest for small inputs, and the reference the chunked path's
        # closed-form gradient is tested against.
        keep = valid.nonzero().squeeze(-1)  # (N',)
        kept_student, kept_teacher = narrow(student, teacher, keep, top_k_support(teacher, top_k))  # (N', W)
        losses = torch.zeros(student.shape[0], dtype=spec.compute_dtype, device=student.device)
        losses = losses.index_copy(0, keep, row_losses(kept_student, kept_teacher, spec))  # (N,)
    else:
        # Blocks are sized by the float32 working width; with top-K a block's rows are only
        # scanned in place by topk and gathered, so many rows fit in one block.
        width = vocab if top_k is None else top_k
        block_rows = chunk_size or max(1, _BLOCK_ELEMENTS // width)
        losses = ChunkedRowLosses.apply(student, teacher, valid, top_k, spec, block_rows)  # (N,)
    if reduction == "none":
        return losses.reshape(batch_shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def _compute_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


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
    """Generalized Jensen-Shannon divergence JSD_beta between teacher and student, per row.

    With p_T = softmax(teacher / tau), p_S = softmax(student / tau) and
    m = beta * p_T + (1 - beta) * p_S, a row's loss is
    tau^2 * (beta * KL(p_T || m) + (1 - beta) * KL(p_S || m)), at most tau^2 times the binary
    entropy of beta. beta = 0 is exactly forward KL(p_T || p_S) and beta = 1 exactly reverse
    KL(p_S || p_T) (TRL's convention).

    Args:
        student_logits: float (..., V), any float dtype; gradients flow into it.
        teacher_logits: float (..., V); detached here, never receives gradient.
        beta: mixture weight in [0, 1].
        top_k: K in [1, V]: both distributions are renormalised over the teacher's K largest
            logits of each row, and student logits outside that support get no gradient.
            None (or V) is the whole vocabulary.
        clip: c > 0 caps the terms before tau^2 scaling; capped terms pass no gradient.
            None: no cap.
        clip_mode: "entry" caps each vocabulary entry's term before the row sum (the paper's
            code, with c = 0.05; a row can still reach K * c); "token" caps the row sum. At
            beta 0 or 1 the entry terms are KL terms, which take both signs, so "entry"
            clipping can make a row negative (JsdParams rejects that combination).
        temperature: tau > 0.
        mask: bool (...), the rows that count; None: all rows.
        reduction: "none" -> (...) with masked rows 0; "sum" over valid rows; "mean" over
            valid rows (0 when none is valid).
        chunk_size: rows per block of the memory-bounded chunked path; None chooses
            automatically (the plain autograd path for small inputs, blocks of about 2**23
            working elements otherwise).

    Returns:
        float32 ((...) or a scalar); float64 when either input is float64.

    Raises:
        ValueError: an argument is invalid; the message names it.
    """
    _check_common(student_logits, teacher_logits, mask, top_k, temperature, reduction, chunk_size)
    _check_jsd_options(beta, clip, clip_mode)
    kind = "forward" if beta == 0 else "reverse" if beta == 1 else "jsd"
    spec = RowSpec(
        kind=kind,
        beta=float(beta),
        clip=None if clip is None else float(clip),
        clip_mode=clip_mode,
        temperature=float(temperature),
        compute_dtype=_compute_dtype(student_logits, teacher_logits),
    )
    return _divergence(student_logits, teacher_logits, mask, top_k, reduction, chunk_size, spec)


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
    """KL divergence per row: "forward" is KL(p_T || p_S), "reverse" is KL(p_S || p_T).

    Same conventions as :func:`generalized_jsd`: p = softmax(logits / tau), result times
    tau^2, optional renormalised teacher top-K support, mask, reductions, chunking, and no
    gradient into the teacher.

    Args:
        student_logits: float (..., V); gradients flow into it.
        teacher_logits: float (..., V); never receives gradient.
        direction: "forward" or "reverse".
        top_k, temperature, mask, reduction, chunk_size: as in :func:`generalized_jsd`.

    Returns:
        float32 ((...) or a scalar); float64 when either input is float64.

    Raises:
        ValueError: an argument is invalid; the message names it.
    """
    _check_common(student_logits, teacher_logits, mask, top_k, temperature, reduction, chunk_size)
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(_DIRECTIONS)}, got {direction!r}")
    spec = RowSpec(
        kind=direction,
        beta=0.0 if direction == "forward" else 1.0,
        clip=None,
        clip_mode="entry",
        temperature=float(temperature),
        compute_dtype=_compute_dtype(student_logits, teacher_logits),
    )
    return _divergence(student_logits, teacher_logits, mask, top_k, reduction, chunk_size, spec)
