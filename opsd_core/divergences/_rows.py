"""The per-row maths shared by the plain and the chunked paths.

Owns: narrowing rows to the teacher's top-K support and to the valid rows, the per-entry
terms of the generalized JSD_beta and of both KLs, clipping, tau^2 scaling, and the
closed-form gradient of a row loss with respect to the student logits.
Does not know: argument checking, reductions, or how rows are grouped into chunks; callers
hand it 2-D blocks of rows (R, V) and a validated :class:`RowSpec`.

Letters: R rows in a block, V vocabulary, K top-K, W the working width (K or V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class RowSpec:
    """How one row's loss is formed from its two distributions.

    ``kind`` is already resolved: a JSD with beta 0 or 1 arrives as "forward" or "reverse",
    because the mixture form tends to 0 at both ends instead of to the KLs.
    """

    kind: Literal["jsd", "forward", "reverse"]
    beta: float
    clip: float | None
    clip_mode: Literal["entry", "token"]
    temperature: float
    compute_dtype: torch.dtype


def top_k_support(teacher: torch.Tensor, top_k: int | None) -> torch.Tensor | None:
    """int64 (R, K) indices of the K largest of float (R, V) teacher logits (any order), or
    None for the whole vocabulary."""
    return None if top_k is None else teacher.topk(top_k, dim=-1, sorted=False).indices


def narrow(
    student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, support: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept rows of a block, restricted to the support.

    Differentiable in ``student`` (gather and index_select), so the plain path can use it
    under autograd. Entries are gathered before rows are dropped, so with K < V no (R, V)
    copy is made.

    Args:
        student: float (R, V) logits.
        teacher: float (R, V) logits, detached.
        keep: int64 (R',) indices of the rows that count.
        support: int64 (R, K) from :func:`top_k_support`, or None for all of V.

    Returns:
        float (R', W) student and float (R', W) teacher logits, in the inputs' dtypes.
    """
    if support is not None:
        student, teacher = student.gather(-1, support), teacher.gather(-1, support)  # (R, K)
    return student.index_select(0, keep), teacher.index_select(0, keep)


def log_probs(logits: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    """float (R, W) log-softmax of float (R, W) ``logits / temperature`` in the compute dtype."""
    scaled = logits.to(spec.compute_dtype)
    if spec.temperature != 1.0:
        scaled = scaled / spec.temperature
    return torch.log_softmax(scaled, dim=-1)


def _weighted_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), exactly 0 where p = 0.

    The ratio is zeroed before the product (not the product afterwards) so that a -inf log p
    never meets a 0 in either the forward or the backward pass: no NaN from 0 * inf.
    """
    p = log_p.exp()
    return p * torch.where(p > 0, log_p - log_q, 0.0)


def _log_mixture(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    """log m for m = beta * p_T + (1 - beta) * p_S, from log-probs, without leaving log space.

    Log-probs are floored at the dtype's lowest finite value first: logaddexp's backward is
    NaN where both arguments are -inf (vocabulary padding masked in both models), even when
    no gradient flows there.
    """
    lowest = torch.finfo(log_s.dtype).min
    return torch.logaddexp(log_s.clamp(min=lowest) + math.log1p(-beta), log_t.clamp(min=lowest) + math.log(beta))


def entry_terms(log_s: torch.Tensor, log_t: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    """float (R, W) per-entry terms whose row sum is the unclipped, unscaled divergence.

    JSD terms beta * t * (log t - log m) + (1 - beta) * s * (log s - log m) are each >= 0 (the
    log-sum inequality); KL terms are not individually signed.
    """
    if spec.kind == "forward":
        return _weighted_log_ratio(log_t, log_s)
    if spec.kind == "reverse":
        return _weighted_log_ratio(log_s, log_t)
    log_m = _log_mixture(log_s, log_t, spec.beta)
    return spec.beta * _weighted_log_ratio(log_t, log_m) + (1.0 - spec.beta) * _weighted_log_ratio(log_s, log_m)


def row_losses(student: torch.Tensor, teacher: torch.Tensor, spec: RowSpec) -> torch.Tensor:
    """float (R,) loss of each row, clipped and scaled by tau^2; differentiable in ``student``.

    Args:
        student: float (R, W) logits.
        teacher: float (R, W) logits, detached.
    """
    terms = entry_terms(log_probs(student, spec), log_probs(teacher, spec), spec)  # (R, W)
    if spec.clip is not None and spec.clip_mode == "entry":
        terms = terms.clamp(max=spec.clip)
    rows = terms.sum(dim=-1)
    if spec.clip is not None and spec.clip_mode == "token":
        rows = rows.clamp(max=spec.clip)
    return rows * spec.temperature**2


def row_loss_gradient(
    student: torch.Tensor, teacher: torch.Tensor, spec: RowSpec, grad_rows: torch.Tensor
) -> torch.Tensor:
    """float (R, W) gradient of ``sum(grad_rows * row_losses(student, teacher))`` in ``student``.

    Written in closed form rather than by autograd so that the chunked backward holds a few
    (R, W) buffers and no graph. With u = student / tau, s = softmax(u) and g_i the derivative
    of a row's summed terms with respect to log s_i, the row's gradient is
    tau * (g - s * sum(g)) (tau^2 from the scaling, 1 / tau from u). Per entry:
    JSD g_i = (1 - beta) * s_i * (log s_i - log m_i) (the teacher-side and mixture-side
    derivatives cancel); forward KL g_i = -t_i; reverse KL g_i = s_i * (log s_i - log t_i + 1).
    Clipped entries (entry mode) or clipped rows (token mode) contribute no g, matching the
    gradient of ``clamp``, which passes at equality.

    Args:
        student: float (R, W) logits.
        teacher: float (R, W) logits.
        grad_rows: float (R,) upstream gradient of each row loss.
    """
    log_s, log_t = log_probs(student, spec), log_probs(teacher, spec)
    s = log_s.exp()
    if spec.kind == "forward":
        scores = -log_t.exp()
    elif spec.kind == "reverse":
        scores = _weighted_log_ratio(log_s, log_t) + s
    else:
        scores = (1.0 - spec.beta) * _weighted_log_ratio(log_s, _log_mixture(log_s, log_t, spec.beta))
    if spec.clip is not None:
        terms = entry_terms(log_s, log_t, spec)
        if spec.clip_mode == "entry":
            scores = scores.masked_fill(terms > spec.clip, 0.0)
        else:
            scores = scores.masked_fill(terms.sum(dim=-1, keepdim=True) > spec.clip, 0.0)
        del terms
    gradient = scores.sub_(s.mul_(scores.sum(dim=-1, keepdim=True)))
    return gradient.mul_(grad_rows.to(spec.compute_dtype).unsqueeze(-1) * spec.temperature)
