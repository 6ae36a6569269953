"""The abstract roles of the method; one file each (docs/architecture.md lists them)."""

from opsd_core.interfaces.backend import FUSED_HEAD, Backend, Capabilities, DecodeState
from opsd_core.interfaces.context import PrivilegedContextBuilder
from opsd_core.interfaces.divergence import Divergence
from opsd_core.interfaces.logger import Logger, MediaSample
from opsd_core.interfaces.sampler import OnPolicySampler
from opsd_core.interfaces.task import Task
from opsd_core.interfaces.teacher import TeacherUpdate

__all__ = [
    "FUSED_HEAD",
    "Backend",
    "Capabilities",
    "DecodeState",
    "Divergence",
    "Logger",
    "MediaSample",
    "OnPolicySampler",
    "PrivilegedContextBuilder",
    "Task",
    "TeacherUpdate",
]
