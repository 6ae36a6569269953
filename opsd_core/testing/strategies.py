"""Hypothesis strategies for divergence tests: logits, masks, and (student, teacher, mask).

Owns: generating small, finite and deliberately awkward inputs — ties, peaked rows, large
common offsets, near-identical student/teacher pairs, one or two batch dimensions — whose
values come from hypothesis itself, so failures shrink to readable tensors.
Does not know: any divergence; plugin authors use these in their own property tests::

    from hypothesis import given
    from opsd_core.testing.strategies import logits_pairs

    @given(logits_pairs())
    def test_non_negative(pair):
        student, teacher, mask = pair
        assert (MyDivergence().per_token(student, teacher, mask) >= 0).all()
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = ["batch_shapes", "logits", "logits_pairs", "masks", "separate_ranks"]

def batch_shapes(*, min_rows: int = 1, max_rows: int = 6, max_dims: int = 2) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes (...) of one or more dimensions whose product is in [min_rows, max_rows]."""

    def fits(shape: tuple[int, ...]) -> bool:
        return min_rows <= int(np.prod(shape)) <= max_rows

    return hnp.array_shapes(min_dims=1, max_dims=max_dims, min_side=1, max_side=max_rows).filter(fits)


def logits(
    shape: tuple[int, ...], *, dtype: torch.dtype = torch.float64, bound: float = 30.0
) -> st.SearchStrategy[torch.Tensor]:
    """float ``dtype`` tensors of ``shape`` with entries in [-bound, bound] plus a per-row
    offset in [-bound, bound] (rows are the last dimension). Entries are often repeated
    (ties) because hypothesis fills arrays with shared values."""
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=64)
    values = hnp.arrays(np.float64, shape, elements=elements)
    offsets = hnp.arrays(np.float64, shape[:-1] + (1,), elements=elements)
    return st.tuples(values, offsets).map(lambda pair: torch.from_numpy(pair[0] + pair[1]).to(dtype))


def masks(shape: tuple[int, ...], *, min_valid: int = 0) -> st.SearchStrategy[torch.Tensor]:
    """bool tensors of ``shape`` with at least ``min_valid`` True entries."""
    size = int(np.prod(shape))

    def build(draw_flags: np.ndarray) -> torch.Tensor:
        flags = draw_flags.reshape(-1).copy()
        missing = min_valid - int(flags.sum())
        if missing > 0:
            flags[np.flatnonzero(~flags)[:missing]] = True
        return torch.from_numpy(flags.reshape(shape))

    return hnp.arrays(np.bool_, (size,)).map(build)


def separate_ranks(teacher: torch.Tensor, gap: float = 1e-3) -> torch.Tensor:
    """float (..., V) ``teacher`` with each row's entries at least ``gap`` apart, order kept.

    Adding ``gap`` times each entry's rank in its row breaks ties without reordering, so a
    top-K support is unambiguous and survives shifting or scaling the row.
    """
    ranks = teacher.argsort(dim=-1, stable=True).argsort(dim=-1)  # (..., V)
    return teacher + gap * ranks.to(teacher.dtype)


@st.composite
def logits_pairs(
    draw,
    *,
    min_rows: int = 1,
    max_rows: int = 6,
    min_vocab: int = 2,
    max_vocab: int = 12,
    max_dims: int = 2,
    dtype: torch.dtype = torch.float64,
    bound: float = 30.0,
    distinct_teacher: bool = False,
    min_valid: int = 1,
):
    """(student, teacher, mask): float (..., V) logits of one shape and a bool (...) mask.

    The student is either independent of the teacher or a perturbation of it (from 1e-6 to
    1), which exercises the near-zero regime where rounding could make a divergence
    negative. ``distinct_teacher`` separates each teacher row's entries (see
    :func:`separate_ranks`) for tests whose top-K support must be unambiguous.
    """
    batch = draw(batch_shapes(min_rows=min_rows, max_rows=max_rows, max_dims=max_dims))
    vocab = draw(st.integers(min_vocab, max_vocab))
    shape = batch + (vocab,)
    teacher = draw(logits(shape, bound=bound))
    if draw(st.booleans()):
        student = draw(logits(shape, bound=bound))
    else:
        scale = draw(st.sampled_from([1e-6, 1e-3, 0.1, 1.0]))
        student = teacher + scale * draw(logits(shape, bound=1.0))
    if distinct_teacher:
        teacher = separate_ranks(teacher)
    mask = draw(masks(batch, min_valid=min(min_valid, int(np.prod(batch)))))
    return student.to(dtype), teacher.to(dtype), mask
