"""The public plugin API: every name a plugin may import from the core, torch-free.

Owns: the list of names (``__all__``) that plugins build on, grouped below: the roles a
plugin implements (loggers included), the data that crosses role boundaries, registration (the hook marker and
the registry), errors, config helpers and the length-budget check. These names keep their
meaning and signatures within a minor version; everything else in ``opsd_core`` is internal
and may change at any release.
Does not know: torch. Importing this module never imports torch, so a plugin's ``plugin.py``
and ``config.py`` can use it while ``opsd --help``, ``opsd list`` and ``opsd validate`` stay
light. The public names that need torch live in four submodules: :mod:`opsd_core.api.backend`
(batching, FSDP building blocks, the sampler), :mod:`opsd_core.api.state_dicts` (weights on
disk), :mod:`opsd_core.api.kernels` (decode-step GPU kernels) and :mod:`opsd_core.api.scoring`
(answer extraction for tasks); test helpers are in :mod:`opsd_core.testing`.
"""

from opsd_core.config import PluginParams, RunConfig, Section, load_config
from opsd_core.contexts.paper import (
    PAPER_REF_INTRO,
    PAPER_TRANSITION,
    PaperContextBuilder,
)
from opsd_core.errors import (
    CapabilityError,
    CheckpointError,
    ConfigError,
    DuplicateNameError,
    OpsdError,
    PluginError,
    UnknownNameError,
)
from opsd_core.hookspecs import hookimpl
from opsd_core.interfaces import (
    FUSED_HEAD,
    Backend,
    Capabilities,
    DecodeState,
    Divergence,
    Logger,
    MediaSample,
    OnPolicySampler,
    PrivilegedContextBuilder,
    Task,
    TeacherUpdate,
)
from opsd_core.length_budget import ContextFloor, check_length_budget, context_floor
from opsd_core.registry import Registry
from opsd_core.types import (
    PROBLEM_IMAGE,
    QUESTION,
    REF_INTRO,
    SYSTEM,
    TRANSITION,
    VISUAL_THOUGHT,
    CompletionBatch,
    CompletionHidden,
    CompletionLogits,
    Context,
    ContextPair,
    Image,
    ImageSegment,
    MemoryShape,
    Problem,
    Score,
    Segment,
    TextSegment,
    Vocabulary,
)

__all__ = [
    # Roles: the abstract classes a plugin implements.
    "Backend",
    "DecodeState",
    "Task",
    "Divergence",
    "TeacherUpdate",
    "OnPolicySampler",
    "Capabilities",
    "FUSED_HEAD",
    "PrivilegedContextBuilder",
    "PaperContextBuilder",
    "Logger",
    "MediaSample",
    "PAPER_REF_INTRO",
    "PAPER_TRANSITION",
    # Data crossing role boundaries, and the names of a context's segments.
    "Problem",
    "Score",
    "Image",
    "TextSegment",
    "ImageSegment",
    "Segment",
    "Context",
    "ContextPair",
    "Vocabulary",
    "MemoryShape",
    "CompletionBatch",
    "CompletionLogits",
    "CompletionHidden",
    "SYSTEM",
    "PROBLEM_IMAGE",
    "QUESTION",
    "REF_INTRO",
    "VISUAL_THOUGHT",
    "TRANSITION",
    # Registration: the hook marker of ``plugin.py`` and the registry each hook fills.
    "hookimpl",
    "Registry",
    # Errors: raise the class that fits, with the field, the bad value and the fix.
    "OpsdError",
    "ConfigError",
    "PluginError",
    "DuplicateNameError",
    "UnknownNameError",
    "CheckpointError",
    "CapabilityError",
    # Config: the base of a plugin's params model, and the run config a backend checks.
    "PluginParams",
    "Section",
    "RunConfig",
    "load_config",
    # Length budget: refusing caps that no problem fits, from ``Backend.check_run``.
    "ContextFloor",
    "context_floor",
    "check_length_budget",
]
