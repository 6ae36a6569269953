"""Padding and completion-row gathering shared by the backends."""

import pytest
import torch

from opsd_core.batching import completion_columns, completion_rows, gather_rows, pad_left, pad_right

ROWS = [[5, 6, 7], [8], [9, 10]]


def test_left_padding_ends_every_row_in_the_last_column():
    padded = pad_left(ROWS, pad_id=0)
    assert padded.token_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert padded.positions.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert padded.lengths.tolist() == [3, 1, 2]


def test_right_padding_starts_every_row_in_the_first_column():
    padded = pad_right(ROWS, pad_id=0)
    assert padded.token_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert padded.positions.tolist() == [[0, 1, 2]] * 3


def test_empty_rows_are_refused():
    with pytest.raises(ValueError, match="at least one token"):
        pad_left([[1], []], pad_id=0)


def test_completion_rows_of_right_padded_sequences():
    hidden = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)  # value = 5 * b + t
    rows = completion_rows(hidden, torch.tensor([2, 3]), width=3)
    assert rows.squeeze(-1).tolist() == [[1, 2, 3], [7, 8, 9]]
    clamped = completion_rows(hidden, torch.tensor([4, 4]), width=3)
    assert clamped.squeeze(-1).tolist() == [[3, 4, 4], [8, 9, 9]]


def test_completion_columns_of_left_padded_sequences():
    # Two rows ending in the last of 4 kept columns, with completions of 2 and 0 tokens.
    index = completion_columns(torch.tensor([2, 0]), width=2, kept=4)
    assert index.tolist() == [[1, 2, 3], [3, 3, 3]]


def test_gather_rows_picks_positions_per_row():
    hidden = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    picked = gather_rows(hidden, torch.tensor([[2, 0], [1, 1]]))
    assert picked.tolist() == [[[4, 5], [0, 1]], [[8, 9], [8, 9]]]
