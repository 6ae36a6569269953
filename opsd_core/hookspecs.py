"""The hooks a plugin may implement: one per registry, plus CLI commands.

Owns: the hook signatures and their documentation (the plugin API).
Does not know: any implementation; built-ins implement these hooks in ``default_plugins``
exactly as a third-party plugin would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from opsd_core.registry import Registry

PROJECT_NAME = "opsd"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_backends(registry: Registry) -> None:
    """Register UMM backends.

    Call ``registry.add(name, factory, params)`` once per backend. ``factory`` builds an
    :class:`opsd_core.interfaces.Backend` from its validated params; pass it as a
    ``"module:attr"`` string so that ``opsd list`` does not import model code.

    :param registry: the backend registry.
    """


@hookspec
def register_tasks(registry: Registry) -> None:
    """Register tasks (problem sources with a scorer).

    ``factory`` builds an :class:`opsd_core.interfaces.Task` from its validated params.

    :param registry: the task registry.
    """


@hookspec
def register_divergences(registry: Registry) -> None:
    """Register per-token divergences.

    ``factory`` builds an :class:`opsd_core.interfaces.Divergence` from its validated params.

    :param registry: the divergence registry.
    """


@hookspec
def register_teacher_updates(registry: Registry) -> None:
    """Register teacher update rules (EMA, frozen, ...).

    ``factory`` builds an :class:`opsd_core.interfaces.TeacherUpdate` from its validated params.

    :param registry: the teacher-update registry.
    """


@hookspec
def register_samplers(registry: Registry) -> None:
    """Register on-policy samplers.

    ``factory(params, backend, sampling)`` builds an :class:`opsd_core.interfaces.OnPolicySampler`
    for the backend from its validated params and the run's ``[sampling]`` policy
    (temperature, completion cap, image skips).

    :param registry: the sampler registry.
    """


@hookspec
def register_contexts(registry: Registry) -> None:
    """Register context builders (the student and the privileged teacher context).

    ``factory(params, backend)`` builds an :class:`opsd_core.interfaces.PrivilegedContextBuilder`
    from its validated params; the backend supplies its family's prompt texts
    (``backend.context_builder()``).

    :param registry: the context-builder registry.
    """


@hookspec
def register_loggers(registry: Registry) -> None:
    """Register loggers (experiment trackers) that ``[logging] loggers`` can name.

    ``factory(run_dir=Path, config=RunConfig)`` builds an :class:`opsd_core.interfaces.Logger`
    on rank 0; list the Python packages it imports in the class's ``packages``, so that a
    missing one is reported before the run starts.

    :param registry: the logger registry.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``opsd`` command line.

    Call ``cli.add_command(command)``. Keep imports inside the command body so that
    ``opsd --help`` stays fast.

    :param cli: the top-level ``opsd`` click group.
    """
