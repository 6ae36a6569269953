"""Batching variable-length token rows, and reading completion rows back out of them.

Owns: right-padding B token rows into one (B, T) block with its attention mask and per-row
positions (each row counts from 0, so a batched row sees exactly what it would alone), and
gathering the N + 1 completion rows of each sequence from (B, T, D) hidden states.
Does not know: models, images or tokenizers. Nothing here is Janus-specific; it is the part
of a backend that every decoder-only model family repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"):
    """Right-pad token rows.

    Returns:
        ids: int64 (B, T) tokens, ``pad_id`` after each row's end.
        attention: int64 (B, T), 1 at real tokens, 0 at padding.
        positions: int64 (B, T), 0, 1, 2, ... in every row (padding continues the count; it is
            never attended to).
        lengths: int64 (B,) tokens per row.
    """
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    attention = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()  # (B, T)
    positions = torch.arange(width).unsqueeze(0).expand(len(rows), width)  # (B, T)
    return ids.to(device), attention.to(device), positions.to(device), lengths.to(device)


def completion_rows(hidden: torch.Tensor, context_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """float (B, width, D): ``hidden[b, context_lengths[b] - 1 + i]`` for i < width.

    ``hidden`` is float (B, T, D) over rows laid out as context then completion; the row at
    the context's last position predicts the first completion token. Indices past a row's end
    are clamped to its last column (their values are masked by the caller).
    """
    offsets = torch.arange(width, device=hidden.device).unsqueeze(0)  # (1, width)
    index = (context_lengths.to(hidden.device).unsqueeze(1) - 1 + offsets).clamp(max=hidden.shape[1] - 1)  # (B, width)
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, width, D)
