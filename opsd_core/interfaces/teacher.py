"""The TeacherUpdate role: how the teacher's weights follow the student.

Owns: creating the teacher module from the student and updating it after optimizer steps.
Does not know: losses, data or backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class TeacherUpdate(ABC):
    """Creates and updates the teacher."""

    @abstractmethod
    def create(self, student: torch.nn.Module) -> torch.nn.Module:
        """The teacher at step 0: a copy of the student that takes no gradient."""

    @abstractmethod
    def update(self, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
        """Called after every optimizer step."""
