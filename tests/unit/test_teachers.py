"""Teacher updates: EMA moves toward the student by exactly the decay, in fp32; frozen stays."""

import pytest
import torch

from opsd_core.teachers.ema import EmaTeacher
from opsd_core.teachers.frozen import FrozenTeacher
from opsd_core.teachers.params import EmaParams


def _student(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).to(dtype)
    model[1].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ema_teacher_is_an_fp32_copy_without_grad_that_shares_the_frozen_fp32_tensors(dtype):
    student = _student(dtype)
    teacher = EmaTeacher(EmaParams(decay=0.9)).create(student)
    for (name, s), (_, t) in zip(student.named_parameters(), teacher.named_parameters()):
        assert not t.requires_grad and t.dtype == torch.float32
        assert torch.equal(t, s.float()), name
        if s.requires_grad or dtype != torch.float32:
            assert t is not s, name
        else:  # never updated, already fp32: one tensor for both (under LoRA, the whole base model)
            assert t is s, name
    assert not teacher.training


def test_ema_update_is_exactly_decay_weighted_and_skips_frozen_parameters():
    student = _student()
    updater = EmaTeacher(EmaParams(decay=0.9))
    teacher = updater.create(student)
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(1.0)
    updater.update(teacher, student)
    after = dict(teacher.named_parameters())
    students = dict(student.named_parameters())
    for name, old in before.items():
        if students[name].requires_grad:
            expected = 0.9 * old + 0.1 * students[name]
            torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-7)
        else:
            assert torch.equal(after[name], old), name


@pytest.mark.parametrize("updater", [EmaTeacher(), FrozenTeacher()], ids=["ema", "frozen"])
def test_frozen_fp32_parameters_are_shared_with_the_student_not_copied(updater):
    student = _student()
    teacher = updater.create(student)
    for (name, s), (_, t) in zip(student.named_parameters(), teacher.named_parameters()):
        assert (t is s) == (not s.requires_grad), name


def test_frozen_bf16_parameters_get_their_own_fp32_copy_in_the_ema_teacher():
    student = _student(torch.bfloat16)
    teacher = EmaTeacher().create(student)
    assert teacher[1].bias is not student[1].bias and teacher[1].bias.dtype == torch.float32


def test_ema_keeps_small_updates_that_bf16_would_round_away():
    student = _student(torch.bfloat16)
    updater = EmaTeacher(EmaParams(decay=0.995))
    teacher = updater.create(student)
    start = teacher[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(0.5)
    updater.update(teacher, student)
    delta = teacher[0].weight - start
    torch.testing.assert_close(delta, torch.full_like(delta, 0.005 * 0.5), rtol=0.02, atol=1e-6)


def test_ema_default_decay_is_the_papers():
    assert EmaTeacher().decay == 0.995


def test_ema_rejects_mismatched_models():
    teacher = EmaTeacher().create(_student())
    with pytest.raises(ValueError, match="different parameters"):
        EmaTeacher().update(teacher, torch.nn.Linear(4, 3))


def test_frozen_teacher_never_moves():
    student = _student()
    updater = FrozenTeacher()
    teacher = updater.create(student)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3.0)
    updater.update(teacher, student)
    assert not torch.equal(teacher[0].weight, student[0].weight)
    assert all(not p.requires_grad for p in teacher.parameters())
