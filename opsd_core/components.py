"""Building the roles a run config names, and checking once that they fit together.

Owns: looking up each plugin section's name in its registry and calling the factory with the
validated section (an instance of the plugin's params model), and :func:`check_components`:
every capability the run needs is one the backend declares, and every capability a backend
declares comes with its methods. After that check the trainer and the experiment follow one
path and never ask a backend what it can do.
Does not know: what the components do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opsd_core.config import RunConfig, lora_settings
from opsd_core.errors import ConfigError, PluginError
from opsd_core.interfaces import Backend, Divergence, OnPolicySampler, PrivilegedContextBuilder, Task, TeacherUpdate
from opsd_core.interfaces.backend import CAPABILITY_METHODS, FUSED_HEAD
from opsd_core import plugins, runtime


@dataclass
class Components:
    """The roles of one run, built from its config and checked against each other."""

    config: RunConfig
    backend: Backend
    task: Task
    divergence: Divergence
    teacher_update: TeacherUpdate
    sampler: OnPolicySampler
    context: PrivilegedContextBuilder
    registries: Any = field(default=None, repr=False)

    def sampler_with(self, **sampling: Any) -> OnPolicySampler:
        """Another sampler of the configured ``[sampler]`` kind, with some ``[sampling]``
        settings replaced: greedy evaluation (``temperature=0.0``, ``max_image_skips=0``) and
        the diagnostics decode with the run's own sampler, whichever plugin that is."""
        registries = self.registries or plugins.get_registries()
        policy = self.config.sampling.model_copy(update=sampling)
        params, entry = self.config.sampler, registries.of("sampler").get(self.config.sampler.name)
        if entry.params is not None and not isinstance(params, entry.params):  # a config validated without plugins
            params = entry.params.model_validate(params.model_dump(exclude={"name"}))
        return entry.resolve()(params, self.backend, policy)

    def evaluation_sampler(self) -> OnPolicySampler:
        """Greedy, up to ``eval.max_completion_tokens`` (else the sampling cap), no image skips."""
        cap = self.config.eval.max_completion_tokens or self.config.sampling.max_completion_tokens
        return self.sampler_with(temperature=0.0, max_completion_tokens=cap, max_image_skips=0)


def build_components(
    config: RunConfig, registries: Any = None, world_size: int = 1, training: bool = True
) -> Components:
    """The backend, task, divergence, teacher update, sampler and context builder named by
    ``config``, checked by :func:`check_components` for a run in ``world_size`` processes (or,
    with ``training`` False, for evaluation: an evaluation-only task is then accepted)."""
    registries = registries or plugins.get_registries()
    backend = build_backend(config, registries, training)

    def build(section: str, *extra: Any) -> Any:
        params = getattr(config, section)
        return registries.of(section).create(params.name, params, *extra)

    components = Components(
        config,
        backend,
        build("task"),
        build("divergence"),
        build("teacher"),
        build("sampler", backend, config.sampling),
        build("context", backend),
        registries,
    )
    check_components(components, world_size, training)
    return components


def build_backend(config: RunConfig, registries: Any = None, training: bool = True) -> Backend:
    """Only the backend named by ``config`` (benchmark evaluation needs no task or loss), its
    declared capabilities checked against its methods, placed on ``run.device`` with the weight
    dtype of ``run.precision`` (fp32 masters when ``training``)."""
    registries = registries or plugins.get_registries()
    backend = registries.of("backend").create(config.backend.name, config.backend)
    check_declared_capabilities(backend)
    backend.place(runtime.resolve_device(config.run.device), runtime.weight_dtype(config.run.precision, training))
    return backend


def check_declared_capabilities(backend: Backend) -> None:
    """Refuse a backend that declares a capability without implementing its methods."""
    missing = [
        f"{flag} (needs {method})"
        for flag in backend.capabilities.declared()
        for method in CAPABILITY_METHODS[flag]
        if getattr(type(backend), method) is getattr(Backend, method)
    ]
    if missing:
        raise PluginError(
            f"backend {type(backend).__name__} declares capabilities it does not implement: {', '.join(missing)}; "
            "implement those methods or leave the flags unset"
        )


def check_components(components: Components, world_size: int = 1, training: bool = True) -> None:
    """Refuse, in one message, a run that needs what its backend (or task) does not declare;
    then let the backend refuse what only it knows (``Backend.check_run``)."""
    config, backend = components.config, components.backend
    capabilities = backend.capabilities
    name = type(backend).__name__
    problems = []
    if training and not components.task.trains:
        problems.append(
            f"task.name: {config.task.name!r} is evaluation-only (it has no training problems); train on a task "
            "with training problems and evaluate on this one with `opsd eval`"
        )
    if components.divergence.uses_hidden_states:
        if not capabilities.hidden_states:
            problems.append(
                f"divergence.fused = true needs final hidden states, but backend {name} does not provide them "
                "(capability hidden_states); set divergence.fused = false"
            )
        elif world_size > 1 and not capabilities.sharded_hidden_states:
            problems.append(
                f"divergence.fused = true needs the whole lm_head weight, but backend {name} cannot give hidden "
                f"states while FSDP shards the model over {world_size} processes (capability sharded_hidden_states); "
                "set divergence.fused = false for multi-process runs"
            )
    if config.sampling.visual_thoughts == "generate" and not capabilities.visual_thoughts:
        problems.append(
            f"sampling.visual_thoughts = 'generate' needs a model that draws, but backend {name} cannot draw "
            "images (capability visual_thoughts); use 'stored' with a task that ships visual thoughts"
        )
    if world_size > 1 and not capabilities.sharding:
        problems.append(
            f"a run in {world_size} processes needs sharding, but backend {name} trains on one device only "
            "(capability sharding); run it in one process"
        )
    if world_size > 1 and training and config.train.optimizer_offload:
        problems.append(
            f"train.optimizer_offload = true keeps AdamW states of one process in host memory, but this run has "
            f"{world_size} processes, whose FSDP shards already divide them; set it to false or run in one process"
        )
    lora = lora_settings(config)
    if lora is not None and world_size > 1:
        problems.append(
            f"backend.lora trains adapters in one process only (got a run in {world_size} processes); "
            "run it in one process or remove [backend.lora]"
        )
    if lora is not None and components.divergence.uses_hidden_states:
        if FUSED_HEAD not in [reader for _, reader in backend.weights_read_directly()]:
            problems.append(
                f"backend.lora with divergence.fused = true: backend {name} does not name the module whose weight "
                "completion_hidden returns, so an adapter on it could not be refused; set divergence.fused = false"
            )
    if problems:
        raise ConfigError(problems[0] if len(problems) == 1 else "; ".join(problems))
    backend.check_run(config)


def direct_weight_reads(components: Components) -> list[tuple[str, str]]:
    """``(module-name pattern, the setting that reads its weight without calling the module)``
    pairs of this run (see ``Backend.weights_read_directly``): where a LoRA adapter must not sit."""
    fused = components.divergence.uses_hidden_states
    return [
        (pattern, "divergence.fused = true" if reader == FUSED_HEAD else reader)
        for pattern, reader in components.backend.weights_read_directly()
        if reader != FUSED_HEAD or fused
    ]
