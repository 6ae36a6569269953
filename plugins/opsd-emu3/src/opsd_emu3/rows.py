"""Token sequences of different lengths as one left-padded batch, and the completion rows in it.

Owns: left padding with an attention mask and per-row RoPE positions (each row's first real
token is position 0), so a row of a batch is computed exactly as the row alone; and the index
of each completion's N + 1 logit rows in the padded batch.
Does not know: models, tokens' meaning or images. Nothing here is Emu3-specific.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PaddedRows:
    """B sequences left-padded to the longest.

    Attributes:
        token_ids: int64 (B, T), pad ids first, then the sequence.
        attention_mask: int64 (B, T), 0 at padding.
        positions: int64 (B, T), 0 .. length - 1 on the sequence, 0 on padding.
        lengths: int64 (B,), each sequence's length.
    """

    token_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device) -> PaddedRows:
        return PaddedRows(*(t.to(device) for t in (self.token_ids, self.attention_mask, self.positions, self.lengths)))


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> PaddedRows:
    """Left-pad ``sequences`` (each at least one token) into a :class:`PaddedRows`."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max())
    token_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        token_ids[row, width - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
    columns = torch.arange(width).unsqueeze(0)  # (1, T)
    start = (width - lengths).unsqueeze(1)  # (B, 1)
    attention_mask = (columns >= start).long()  # (B, T)
    positions = (columns - start).clamp(min=0)  # (B, T)
    return PaddedRows(token_ids, attention_mask, positions, lengths)


def completion_columns(lengths: torch.Tensor, width: int, kept: int) -> torch.Tensor:
    """int64 (B, N + 1): where each completion row sits among the last ``kept`` columns.

    Row b's sequence, left-padded so that it ends in the last column, is its context followed by
    ``lengths[b]`` completion tokens; entry i is the column (counted within the last ``kept``)
    whose logits predict completion token i, so entry ``lengths[b]`` is the last column. Entries
    past a completion's end repeat the last column (they are masked). ``kept`` must exceed
    every length.
    """
    index = (kept - 1 - lengths).unsqueeze(1) + torch.arange(width + 1, device=lengths.device).unsqueeze(0)  # (B, N + 1)
    return index.clamp(max=kept - 1)
