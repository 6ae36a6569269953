"""EMA teacher: an fp32 copy of the student that follows it after every optimizer step.

Owns: the copy and the update rule, applied in fp32 to every trainable parameter (frozen fp32
parameters, the whole base model under LoRA, are the student's own tensors, not copies: they
are equal anyway).
Does not know: losses, data or when steps happen (the trainer calls ``update``).
"""

from __future__ import annotations

import copy

import torch

from opsd_core.interfaces.teacher import TeacherUpdate
from opsd_core.teachers.params import EmaParams


def detached_copy(student: torch.nn.Module, share_frozen_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy of ``student`` in eval mode whose parameters take no gradient.

    The student's frozen parameters (``requires_grad`` off: they never change) are shared, not
    copied; with ``share_frozen_dtype`` given, only those of that dtype are.
    """
    shared = {
        id(parameter): parameter
        for parameter in student.parameters()
        if not parameter.requires_grad and not parameter.is_meta and share_frozen_dtype in (None, parameter.dtype)
    }
    teacher = copy.deepcopy(student, shared)
    teacher.requires_grad_(False)
    return teacher.eval()


class EmaTeacher(TeacherUpdate):
    """``teacher <- decay * teacher + (1 - decay) * student`` for every trainable parameter.

    The teacher's floating-point parameters are kept in fp32 whatever the student's dtype, so
    that small updates (1 - decay = 0.005) are not rounded away in bf16.
    """

    def __init__(self, params: EmaParams | None = None):
        self.decay = (params or EmaParams()).decay

    def create(self, student: torch.nn.Module) -> torch.nn.Module:
        # Frozen fp32 tensors are the student's own; the others are copied (and cast to fp32).
        teacher = detached_copy(student, share_frozen_dtype=torch.float32)
        shared = {id(parameter) for parameter in student.parameters()}
        for parameter in teacher.parameters():
            if parameter.is_floating_point() and id(parameter) not in shared:
                parameter.data = parameter.data.float()
        return teacher

    @torch.no_grad()
    def update(self, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
        pairs = _trainable_pairs(teacher, student)
        if not pairs:
            return
        teacher_tensors = [t for t, _ in pairs]
        student_tensors = [s.detach().float() for _, s in pairs]
        torch._foreach_mul_(teacher_tensors, self.decay)
        torch._foreach_add_(teacher_tensors, student_tensors, alpha=1.0 - self.decay)


def _trainable_pairs(teacher: torch.nn.Module, student: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    student_parameters = dict(student.named_parameters())
    teacher_parameters = dict(teacher.named_parameters())
    if student_parameters.keys() != teacher_parameters.keys():
        missing = sorted(student_parameters.keys() ^ teacher_parameters.keys())[:5]
        raise ValueError(f"teacher and student have different parameters, e.g. {missing}")
    return [
        (teacher_parameters[name], parameter)
        for name, parameter in student_parameters.items()
        if parameter.requires_grad
    ]
