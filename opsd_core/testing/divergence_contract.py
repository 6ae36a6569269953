"""The contract every Divergence must honour, as checks a plugin's own tests run.

Owns: the guarantees the trainer relies on whatever the formula — ``per_token`` returns
shape (...) in float32, finite and non-negative, zero for identical inputs, zero and
gradient-free on masked rows (whatever they hold), no gradient into the teacher, some
gradient into the student, invariance to a constant added to a row of either input's
logits, bf16 inputs accepted, inputs left unmodified.
Does not know: any formula; a divergence is only ever called through ``per_token``.

Use it either as a pytest base class (one test per guarantee)::

    import pytest
    from opsd_core.testing.divergence_contract import DivergenceContract

    class TestMyDivergence(DivergenceContract):
        @pytest.fixture
        def divergence(self):
            return MyDivergence(MyParams())

or in one call: ``check_divergence_contract(MyDivergence(MyParams()))``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest
import torch

from opsd_core.interfaces.divergence import Divergence

__all__ = [
    "CHECKS",
    "DivergenceContract",
    "check_bfloat16_inputs",
    "check_divergence_contract",
    "check_finite_and_non_negative",
    "check_inputs_not_modified",
    "check_invariant_to_row_constants",
    "check_masked_rows_are_zero_without_gradient",
    "check_output_shape_and_dtype",
    "check_student_receives_gradient",
    "check_teacher_receives_no_gradient",
    "check_zero_for_identical_inputs",
]

# float32 rounding of a softmax over a few logits of magnitude <= ~60.
TOLERANCE = 1e-4


def _logits(shape: tuple[int, ...], seed: int, style: str) -> torch.Tensor:
    """float32 logits of ``shape`` in one of several awkward styles."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=generator)
    if style == "wide":
        return values * 8.0
    if style == "peaked":
        spike = torch.zeros(shape).scatter_(-1, torch.zeros(shape[:-1] + (1,), dtype=torch.long), 25.0)
        return values + spike
    if style == "ties":
        return values.round()
    if style == "offset":
        return values * 3.0 + 40.0
    return values


_STYLES = ("plain", "wide", "peaked", "ties", "offset")


def _pairs(vocab: int, shape: tuple[int, ...] = (2, 3)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(student, teacher) float32 (*shape, V) pairs, one per style."""
    for index, style in enumerate(_STYLES):
        student = _logits(shape + (vocab,), 2 * index, style)
        teacher = _logits(shape + (vocab,), 2 * index + 1, style)
        yield student, teacher


_MASK = torch.tensor([[True, False, True], [True, True, False]])  # (2, 3)


def check_output_shape_and_dtype(divergence: Divergence, vocab: int = 11) -> None:
    """(..., V) logits give (...) float32 rows, with and without a mask, for 0 to 2 batch dims."""
    for shape in ((), (4,), (2, 3)):
        student, teacher = _logits(shape + (vocab,), 0, "plain"), _logits(shape + (vocab,), 1, "plain")
        rows = divergence.per_token(student, teacher)
        assert rows.shape == shape, f"per_token of {shape + (vocab,)} logits must have shape {shape}, got {tuple(rows.shape)}"
        assert rows.dtype == torch.float32, f"per_token must return float32 for float32 logits, got {rows.dtype}"
        masked = divergence.per_token(student, teacher, torch.ones(shape, dtype=torch.bool))
        assert masked.shape == shape, f"per_token with a mask must have shape {shape}, got {tuple(masked.shape)}"


def check_finite_and_non_negative(divergence: Divergence, vocab: int = 11) -> None:
    """Rows are finite and >= 0 (up to float32 rounding) on peaked, tied and offset logits."""
    for student, teacher in _pairs(vocab):
        rows = divergence.per_token(student, teacher, _MASK)
        assert torch.isfinite(rows).all(), f"per_token returned non-finite rows {rows.tolist()}"
        assert (rows >= -TOLERANCE).all(), f"per_token returned a negative row {float(rows.min())}"


def check_zero_for_identical_inputs(divergence: Divergence, vocab: int = 11) -> None:
    """The same logits as student and teacher give 0 on every row."""
    for student, _ in _pairs(vocab):
        rows = divergence.per_token(student, student.clone())
        assert float(rows.abs().max()) <= TOLERANCE, f"identical inputs must give 0, got {rows.tolist()}"


def check_masked_rows_are_zero_without_gradient(divergence: Divergence, vocab: int = 11) -> None:
    """Masked rows are 0, receive no gradient, and do not change the valid rows even when
    they hold extreme values."""
    for student, teacher in _pairs(vocab):
        clean = divergence.per_token(student, teacher, _MASK).detach()
        garbage_student, garbage_teacher = student.clone(), teacher.clone()
        garbage_student[~_MASK] = 1e4
        garbage_teacher[~_MASK] = -1e4
        garbage_student.requires_grad_(True)
        rows = divergence.per_token(garbage_student, garbage_teacher, _MASK)
        assert (rows[~_MASK] == 0).all(), f"masked rows must be 0, got {rows[~_MASK].tolist()}"
        assert torch.allclose(rows[_MASK], clean[_MASK], atol=TOLERANCE), "masked rows changed the valid rows"
        rows.sum().backward()
        assert garbage_student.grad is not None, "the student received no gradient"
        assert torch.count_nonzero(garbage_student.grad[~_MASK]) == 0, "masked rows received gradient"


def check_teacher_receives_no_gradient(divergence: Divergence, vocab: int = 11) -> None:
    """A teacher tensor that requires grad still gets none (``teacher.grad is None``)."""
    student, teacher = next(_pairs(vocab))
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    divergence.per_token(student, teacher, _MASK).sum().backward()
    assert teacher.grad is None, "the teacher received gradient: detach teacher_logits inside per_token"


def check_student_receives_gradient(divergence: Divergence, vocab: int = 11) -> None:
    """Rows depend differentiably on the student: some valid row gets a finite, nonzero gradient."""
    student, teacher = next(_pairs(vocab))
    student.requires_grad_(True)
    rows = divergence.per_token(student, teacher, _MASK)
    assert rows.requires_grad, "per_token's output does not require grad although student_logits does"
    rows.sum().backward()
    assert torch.isfinite(student.grad).all(), "the student's gradient is not finite"
    assert torch.count_nonzero(student.grad[_MASK]) > 0, "no valid row passed gradient to the student"


def check_invariant_to_row_constants(divergence: Divergence, vocab: int = 11) -> None:
    """Adding a constant (different per row) to either input's logits changes nothing."""
    shifts_student = torch.tensor([[7.0, -3.0, 20.0], [-20.0, 0.5, 11.0]]).unsqueeze(-1)  # (2, 3, 1)
    shifts_teacher = torch.tensor([[-5.0, 13.0, -0.25], [9.0, -17.0, 2.0]]).unsqueeze(-1)  # (2, 3, 1)
    for student, teacher in _pairs(vocab):
        base = divergence.per_token(student, teacher, _MASK)
        moved = divergence.per_token(student + shifts_student, teacher + shifts_teacher, _MASK)
        assert torch.allclose(moved, base, atol=TOLERANCE, rtol=1e-3), (
            f"adding a constant to each row's logits changed the rows: {base.tolist()} -> {moved.tolist()}"
        )


def check_bfloat16_inputs(divergence: Divergence, vocab: int = 11) -> None:
    """bf16 logits give finite float32 rows close to those of the same values in float32, and
    a bf16 student gets a finite bf16 gradient."""
    for student, _ in _pairs(vocab):
        # Distinct halves are exact in bf16: no ties, so any top-K support is the same in both dtypes.
        generator = torch.Generator().manual_seed(vocab)
        teacher = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(6)]).reshape(2, 3, vocab) * 0.5
        low_student, low_teacher = student.bfloat16().requires_grad_(True), teacher.bfloat16()
        rows = divergence.per_token(low_student, low_teacher, _MASK)
        assert rows.dtype == torch.float32, f"bf16 logits must give float32 rows, got {rows.dtype}"
        expected = divergence.per_token(low_student.detach().float(), low_teacher.float(), _MASK)
        assert torch.allclose(rows, expected, atol=1e-3, rtol=1e-2), "bf16 logits must be computed in float32"
        rows.sum().backward()
        assert low_student.grad.dtype == torch.bfloat16 and torch.isfinite(low_student.grad).all()


def check_inputs_not_modified(divergence: Divergence, vocab: int = 11) -> None:
    """``per_token`` and its backward leave the logits and the mask untouched."""
    student, teacher = next(_pairs(vocab))
    mask = _MASK.clone()
    copies = (student.clone(), teacher.clone(), mask.clone())
    student.requires_grad_(True)
    divergence.per_token(student, teacher, mask).sum().backward()
    for name, before, after in zip(("student_logits", "teacher_logits", "mask"), copies, (student, teacher, mask)):
        assert torch.equal(before, after.detach()), f"per_token modified {name} in place"


CHECKS: tuple[Callable[[Divergence, int], None], ...] = (
    check_output_shape_and_dtype,
    check_finite_and_non_negative,
    check_zero_for_identical_inputs,
    check_masked_rows_are_zero_without_gradient,
    check_teacher_receives_no_gradient,
    check_student_receives_gradient,
    check_invariant_to_row_constants,
    check_bfloat16_inputs,
    check_inputs_not_modified,
)


def check_divergence_contract(divergence: Divergence, vocab: int = 11) -> None:
    """Run every check of :data:`CHECKS`; an AssertionError names the first broken guarantee.

    Args:
        divergence: the instance under test.
        vocab: V of the generated logits; at least 2.
    """
    for check in CHECKS:
        check(divergence, vocab)


class DivergenceContract:
    """pytest base class: subclass it, override the ``divergence`` fixture (parametrize it to
    cover several params), and every guarantee runs as its own test. Set ``vocab`` to
    change V."""

    vocab: ClassVar[int] = 11

    @pytest.fixture
    def divergence(self) -> Divergence:
        pytest.fail("override the `divergence` fixture to return the Divergence under test")

    def test_output_shape_and_dtype(self, divergence: Divergence) -> None:
        check_output_shape_and_dtype(divergence, self.vocab)

    def test_finite_and_non_negative(self, divergence: Divergence) -> None:
        check_finite_and_non_negative(divergence, self.vocab)

    def test_zero_for_identical_inputs(self, divergence: Divergence) -> None:
        check_zero_for_identical_inputs(divergence, self.vocab)

    def test_masked_rows_are_zero_without_gradient(self, divergence: Divergence) -> None:
        check_masked_rows_are_zero_without_gradient(divergence, self.vocab)

    def test_teacher_receives_no_gradient(self, divergence: Divergence) -> None:
        check_teacher_receives_no_gradient(divergence, self.vocab)

    def test_student_receives_gradient(self, divergence: Divergence) -> None:
        check_student_receives_gradient(divergence, self.vocab)

    def test_invariant_to_row_constants(self, divergence: Divergence) -> None:
        check_invariant_to_row_constants(divergence, self.vocab)

    def test_bfloat16_inputs(self, divergence: Divergence) -> None:
        check_bfloat16_inputs(divergence, self.vocab)

    def test_inputs_not_modified(self, divergence: Divergence) -> None:
        check_inputs_not_modified(divergence, self.vocab)
