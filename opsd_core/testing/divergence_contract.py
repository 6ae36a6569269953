"""Contract checks every Divergence must pass, for plugin authors' test suites.

Owns: the guarantees the trainer relies on whatever the divergence: per-row output of shape
(...), finite and non-negative, zero for identical inputs, masked rows zero and without
gradient, no gradient into the teacher, invariance to a constant added to a row's logits,
and bf16 inputs accepted.
Does not know: the divergence's formula.

Use from a plugin's tests::

    from opsd_core.testing.divergence_contract import check_divergence_contract

    def test_contract():
        check_divergence_contract(MyDivergence(MyParams()))
"""

from __future__ import annotations

import torch

from opsd_core.interfaces import Divergence


def check_divergence_contract(divergence: Divergence, vocab: int = 11, seed: int = 0, atol: float = 1e-5) -> None:
    """Raise AssertionError naming the first broken guarantee."""
    generator = torch.Generator().manual_seed(seed)
    student = (torch.randn(2, 3, vocab, generator=generator) * 3).requires_grad_(True)
    teacher = (torch.randn(2, 3, vocab, generator=generator) * 3).requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, False]])

    rows = divergence.per_token(student, teacher, mask)
    assert rows.shape == (2, 3), f"per_token must return shape (...) = (2, 3), got {tuple(rows.shape)}"
    assert rows.dtype == torch.float32, f"per_token must return float32, got {rows.dtype}"
    assert torch.isfinite(rows).all(), "per_token returned non-finite values"
    assert (rows >= -atol).all(), f"per_token returned a negative value {float(rows.min())}"
    assert (rows[~mask] == 0).all(), "masked rows must be 0"

    rows.sum().backward()
    assert teacher.grad is None or torch.count_nonzero(teacher.grad) == 0, "the teacher received gradient"
    assert student.grad is not None, "the student received no gradient"
    assert torch.count_nonzero(student.grad[~mask]) == 0, "masked rows received gradient"

    same = student.detach()
    zero = divergence.per_token(same, same.clone())
    assert float(zero.abs().max()) <= atol, f"identical inputs must give 0, got {float(zero.abs().max())}"

    shifted = divergence.per_token(student.detach() + 7.0, teacher.detach() - 3.0, mask)
    base = divergence.per_token(student.detach(), teacher.detach(), mask)
    assert torch.allclose(shifted, base, atol=1e-4), "adding a constant to a row's logits changed the result"

    half = divergence.per_token(student.detach().bfloat16(), teacher.detach().bfloat16(), mask)
    assert half.dtype == torch.float32 and torch.isfinite(half).all(), "bf16 inputs must give finite float32 rows"
