"""Hypothesis strategies for divergence tests: logits pairs and masks.

Owns: generating small, finite, sometimes adversarial (peaked, tied, large-offset) logits.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def logits_pairs(draw, min_vocab: int = 2, max_vocab: int = 12, max_rows: int = 5, dtype=torch.float64):
    """(student, teacher, mask): float (R, V) logits and a bool (R,) mask with >= 1 True."""
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(min_vocab, max_vocab))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0, 12.0]))
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale
    if draw(st.booleans()):
        teacher = teacher + draw(st.floats(-50, 50))
    mask = torch.rand(rows, generator=generator) > 0.3
    mask[draw(st.integers(0, rows - 1))] = True
    return student.to(dtype), teacher.to(dtype), mask
