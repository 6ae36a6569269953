"""The abstract roles of the method; one file each (see DESIGN.md section 3)."""

from opsd_core.interfaces.backend import Backend, DecodeState
from opsd_core.interfaces.context import PaperContextBuilder, PrivilegedContextBuilder
from opsd_core.interfaces.divergence import Divergence
from opsd_core.interfaces.sampler import OnPolicySampler
from opsd_core.interfaces.task import Task
from opsd_core.interfaces.teacher import TeacherUpdate

__all__ = [
    "Backend",
    "DecodeState",
    "Divergence",
    "OnPolicySampler",
    "PaperContextBuilder",
    "PrivilegedContextBuilder",
    "Task",
    "TeacherUpdate",
]
