"""Batching token rows of different lengths, and reading completion rows back out.

Owns: left and right padding of B token rows into one (B, T) block with its attention mask
and per-row positions (each row counts from 0, so a batched row is computed exactly as the row
alone), and gathering each completion's N + 1 logit rows from (B, T, D) hidden states. Every
decoder-only backend needs these; they are here so that none repeats them.
Does not know: models, images, tokenizers or what the rows mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PaddedRows:
    """B token rows padded to the longest.

    Attributes:
        token_ids: int64 (B, T).
        attention_mask: int64 (B, T), 1 at real tokens, 0 at padding.
        positions: int64 (B, T), 0 .. length - 1 along each row's tokens (padding: left-padded
            rows hold 0, right-padded rows continue the count; it is never attended to).
        lengths: int64 (B,) tokens per row.
    """

    token_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device | str) -> PaddedRows:
        return PaddedRows(*(t.to(device) for t in (self.token_ids, self.attention_mask, self.positions, self.lengths)))


def _lengths(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("every row needs at least one token")
    return torch.tensor([len(row) for row in rows], dtype=torch.long)


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> PaddedRows:
    """Rows ending in the last column, ``pad_id`` before them."""
    lengths = _lengths(rows)
    width = int(lengths.max())
    token_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        token_ids[index, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
    columns = torch.arange(width).unsqueeze(0)  # (1, T)
    start = (width - lengths).unsqueeze(1)  # (B, 1)
    return PaddedRows(token_ids, (columns >= start).long(), (columns - start).clamp(min=0), lengths)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> PaddedRows:
    """Rows starting in the first column, ``pad_id`` after them."""
    lengths = _lengths(rows)
    width = int(lengths.max())
    token_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        token_ids[index, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    columns = torch.arange(width).unsqueeze(0)  # (1, T)
    attention = (columns < lengths.unsqueeze(1)).long()  # (B, T)
    return PaddedRows(token_ids, attention, columns.expand(len(rows), width).clone(), lengths)


def gather_rows(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """float (B, R, D): ``hidden[b, index[b, r]]`` of float (B, T, D) ``hidden`` and int64 (B, R) ``index``."""
    index = index.to(hidden.device)
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def completion_rows(hidden: torch.Tensor, context_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """float (B, width, D): the completion rows of right-padded ``hidden`` (B, T, D).

    Each row is a context of ``context_lengths[b]`` tokens followed by its completion; row i
    (``hidden[b, context_lengths[b] - 1 + i]``) predicts completion token i. Indices past a
    row's end are clamped to the last column (the caller masks them).
    """
    offsets = torch.arange(width, device=hidden.device).unsqueeze(0)  # (1, width)
    index = (context_lengths.to(hidden.device).unsqueeze(1) - 1 + offsets).clamp(max=hidden.shape[1] - 1)
    return gather_rows(hidden, index)


def completion_columns(lengths: torch.Tensor, width: int, kept: int) -> torch.Tensor:
    """int64 (B, width + 1): where each completion row sits among the last ``kept`` columns of
    left-padded rows ending with their completions of ``lengths[b]`` tokens; entry i predicts
    completion token i, entry ``lengths[b]`` is the last column, later entries repeat it (masked).
    ``kept`` must exceed every length."""
    index = (kept - 1 - lengths).unsqueeze(1) + torch.arange(width + 1, device=lengths.device).unsqueeze(0)
    return index.clamp(max=kept - 1)
