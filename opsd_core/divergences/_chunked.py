"""Row losses computed a block of rows at a time, with a recomputing backward.

Owns: the memory bound of the divergences at large N x V (the paper's 8192 x 152,064):
forward keeps only the (N,) row losses (and, when small, the top-K supports); backward
recomputes each block and writes its closed-form gradient into one preallocated tensor of
the student's dtype, so no float32 (N, V) buffer ever exists. (Autograd's own gather
backward would: on CPU it accumulates a bf16 gradient through a float32 (N, V) buffer.)
Does not know: argument checking, reductions, or the formulas themselves (:mod:`._rows`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from opsd_core.divergences._rows import narrow, row_loss_gradient, row_losses, top_k_support

# Top-K supports of all rows are kept from forward to backward when they fit in this many
# int64 elements (64 MiB); larger ones are recomputed per block rather than stored.
_STORED_SUPPORT_ELEMENTS = 1 << 23


def _blocks(valid: torch.Tensor, block_rows: int):
    """(rows slice, int64 indices of the valid rows inside it) for each block with a valid row."""
    for start in range(0, valid.shape[0], block_rows):
        rows = slice(start, start + block_rows)
        keep = valid[rows].nonzero().squeeze(-1)  # (R',)
        if keep.numel():
            yield rows, keep


class ChunkedRowLosses(torch.autograd.Function):
    """``apply(student, teacher, valid, top_k, spec, block_rows)`` -> (N,) row losses.

    Args of ``apply``:
        student: float (N, V) logits; the only input that receives gradient.
        teacher: float (N, V) logits, detached.
        valid: bool (N,); other rows are 0 and are never computed, so whatever they hold
            (even NaN) cannot reach the loss or the gradient.
        top_k: K for the teacher's top-K support, or None for the whole vocabulary.
        spec: the row formula.
        block_rows: rows per block.

    Returns float (N,) in ``spec.compute_dtype``.
    """

    @staticmethod
    def forward(ctx, student, teacher, valid, top_k, spec, block_rows):
        ctx.save_for_backward(student, teacher, valid)
        ctx.top_k, ctx.spec, ctx.block_rows = top_k, spec, block_rows
        store = top_k is not None and top_k * student.shape[0] <= _STORED_SUPPORT_ELEMENTS
        ctx.supports = [] if store else None
        losses = torch.zeros(student.shape[0], dtype=spec.compute_dtype, device=student.device)  # (N,)
        for rows, keep in _blocks(valid, block_rows):
            support = top_k_support(teacher[rows], top_k)  # (R, K) or None
            if store:
                ctx.supports.append(support)
            block_student, block_teacher = narrow(student[rows], teacher[rows], keep, support)  # (R', W)
            losses[rows].index_copy_(0, keep, row_losses(block_student, block_teacher, spec))
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        student, teacher, valid = ctx.saved_tensors
        gradient = torch.zeros_like(student)  # (N, V), the student's dtype
        for block, (rows, keep) in enumerate(_blocks(valid, ctx.block_rows)):
            if ctx.supports is None:
                support = top_k_support(teacher[rows], ctx.top_k)  # (R, K) or None
            else:
                support = ctx.supports[block]
            block_student, block_teacher = narrow(student[rows], teacher[rows], keep, support)  # (R', W)
            block_gradient = row_loss_gradient(block_student, block_teacher, ctx.spec, grad_losses[rows][keep])
            block_gradient = block_gradient.to(gradient.dtype)  # (R', W)
            if support is None:
                gradient[rows].index_copy_(0, keep, block_gradient)
            else:
                gradient[rows].index_put_((keep.unsqueeze(-1), support.index_select(0, keep)), block_gradient)
        return gradient, None, None, None, None, None
