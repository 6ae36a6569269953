"""Reducing per-row losses to the step loss.

Owns: the reduction rule of docs/architecture.md, "Numerics" (mean over each sample's valid rows, samples
weighted equally), chosen so that any split of a step into micro-batches x gradient
accumulation gives the same loss and gradient.
Does not know: which divergence produced the rows.
"""

from __future__ import annotations

import torch


def per_sample_mean(per_row: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 (B,): mean of float (B, T) ``per_row`` over the True entries of bool (B, T)
    ``mask`` in each row (0 for a row with none)."""
    mask = mask.to(per_row.dtype)
    counts = mask.sum(dim=1)
    return (per_row * mask).sum(dim=1) / counts.clamp(min=1)


def micro_batch_loss(per_row: torch.Tensor, mask: torch.Tensor, samples_per_step: int) -> torch.Tensor:
    """This micro-batch's share of the step loss: the sum of its per-sample means divided by
    the number of samples in the whole optimizer step. Summing the shares of all micro-batches
    gives the mean over the step's samples, whatever the split."""
    return per_sample_mean(per_row, mask).sum() / samples_per_step


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float32 (B, T) cross-entropy of float (B, T, V) ``logits`` against int64 (B, T) targets
    (the SFT control's per-row loss)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
