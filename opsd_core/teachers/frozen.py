"""Frozen teacher: the starting weights, never updated.

Owns: nothing but the copy. Used for ablations and for the gap-closure reference.
"""

from __future__ import annotations

import torch

from opsd_core.interfaces.teacher import TeacherUpdate
from opsd_core.teachers.ema import detached_copy
from opsd_core.teachers.params import FrozenParams


class FrozenTeacher(TeacherUpdate):
    """The teacher is the student at step 0 and stays so."""

    def __init__(self, params: FrozenParams | None = None):
        self.params = params or FrozenParams()

    def create(self, student: torch.nn.Module) -> torch.nn.Module:
        return detached_copy(student)

    def update(self, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
        return None
