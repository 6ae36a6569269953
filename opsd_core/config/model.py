"""The complete run configuration model, with plugin sections typed by the registries.

Owns: building the ``RunConfig`` class whose plugin sections (``backend``, ``task``,
``divergence``, ``teacher``, ``sampler``, ``context``) are each a discriminated union, keyed by
``name``, over the params models the loaded plugins registered.
Does not know: torch or what any plugin does.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    Discriminator,
    Field,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from opsd_core.config.base import PluginParams, Section
from opsd_core.config.sections import (
    DiagnosticsSection,
    EvalSection,
    ExperimentSection,
    LoggingSection,
    LoraSection,
    OptimSection,
    PluginSection,
    RunSection,
    SamplingSection,
    ScheduleSection,
    TrainSection,
)
from opsd_core.errors import closest_match

if TYPE_CHECKING:
    from opsd_core.plugins import Registries

# Plugin sections of the run config: section name -> (registry kind, default entry name).
PLUGIN_SECTIONS: dict[str, str] = {
    "backend": "tiny-umm",
    "task": "frozen-lake",
    "divergence": "jsd",
    "teacher": "ema",
    "sampler": "batched",
    "context": "paper",
}


class RunConfig(Section):
    """Everything a run needs. Plugin sections select a registered entry by ``name``."""

    plugin_names: ClassVar[dict[str, list[str]]] = {}
    logger_names: ClassVar[list[str] | None] = None

    run: RunSection = Field(default_factory=RunSection, description="Run name, output and seed.")
    backend: PluginSection = Field(
        default_factory=lambda: PluginSection(name=PLUGIN_SECTIONS["backend"]),
        description="The UMM backend and its params.",
    )
    task: PluginSection = Field(
        default_factory=lambda: PluginSection(name=PLUGIN_SECTIONS["task"]),
        description="The task (problems and scorer) and its params.",
    )
    divergence: PluginSection = Field(
        default_factory=lambda: PluginSection(name=PLUGIN_SECTIONS["divergence"]),
        description="The per-token divergence and its params.",
    )
    teacher: PluginSection = Field(
        default_factory=lambda: PluginSection(name=PLUGIN_SECTIONS["teacher"]),
        description="How the teacher follows the student (EMA, frozen).",
    )
    sampler: PluginSection = Field(
        default_factory=lambda: PluginSection(name=PLUGIN_SECTIONS["sampler"]),
        description="The on-policy sampler that follows [sampling], and its params.",
    )
    context: PluginSection = Field(
        default_factory=lambda: PluginSection(name=PLUGIN_SECTIONS["context"]),
        description="The builder of the student and teacher contexts, and its params.",
    )
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="On-policy sampling policy.")
    optim: OptimSection = Field(default_factory=OptimSection, description="Optimizer.")
    schedule: ScheduleSection = Field(default_factory=ScheduleSection, description="Learning-rate schedule.")
    train: TrainSection = Field(default_factory=TrainSection, description="Training loop.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Greedy evaluation.")
    diagnostics: DiagnosticsSection = Field(default_factory=DiagnosticsSection, description="KL diagnostic.")
    experiment: ExperimentSection = Field(
        default_factory=ExperimentSection, description="Phases of `opsd run`: OPSD and the controls."
    )
    logging: LoggingSection = Field(
        default_factory=LoggingSection, description="Loggers (experiment trackers) and media."
    )

    @field_validator("logging")
    @classmethod
    def _known_loggers(cls, logging: LoggingSection) -> LoggingSection:
        if not cls.logger_names:  # a model built without registries, or with no logger registered
            return logging
        for name in logging.loggers:
            if name not in cls.logger_names:
                message = f"unknown logger {name!r} in loggers; known loggers: {', '.join(cls.logger_names)}"
                close = closest_match(name, cls.logger_names)
                raise ValueError(message + (f". Did you mean {close!r}?" if close else ""))
        return logging

    @field_validator("eval")
    @classmethod
    def _known_benchmarks(cls, evaluation: EvalSection) -> EvalSection:
        tasks = cls.plugin_names.get("task")
        if not tasks:  # a model built without registries
            return evaluation
        for name in evaluation.benchmarks:
            if name not in tasks:
                message = f"unknown benchmark {name!r} in benchmarks; known tasks: {', '.join(tasks)}"
                close = closest_match(name, tasks)
                raise ValueError(message + (f". Did you mean {close!r}?" if close else ""))
        return evaluation

    @model_validator(mode="after")
    def _shuffled_control_has_donors(self) -> RunConfig:
        step_problems = self.train.samples_per_step * self.train.grad_accum
        if self.experiment.shuffled_vt_control and step_problems < 2:
            raise ValueError(
                f"experiment.shuffled_vt_control needs at least 2 problems per step to give each another's visual "
                f"thought (got train.samples_per_step x train.grad_accum = {step_problems}); raise either"
            )
        return self

    @model_validator(mode="after")
    def _schedule_decays(self) -> RunConfig:
        if self.schedule.min_lr > self.optim.lr:
            raise ValueError(
                f"schedule.min_lr ({self.schedule.min_lr}) must not exceed optim.lr ({self.optim.lr}): "
                "the cosine decays from optim.lr down to schedule.min_lr"
            )
        return self


# Fields the core adds to every backend's section, whatever its plugin: the core applies them
# to the model the backend builds.
_BACKEND_FIELDS: dict[str, Any] = {
    "lora": (
        LoraSection | None,
        Field(None, description="LoRA adapters on the student ([backend.lora]; absent: no adapters)."),
    ),
}


def lora_settings(config: RunConfig) -> LoraSection | None:
    """The run's ``[backend.lora]`` (None: no LoRA). A ``RunConfig`` validated without the
    plugin registries keeps the backend's keys as given, so a table there is validated here."""
    value = getattr(config.backend, "lora", None)
    return value if value is None or isinstance(value, LoraSection) else LoraSection.model_validate(value)


def _section_class_name(section: str, entry_name: str) -> str:
    words = re.split(r"[-_]", entry_name) + [section]
    return "".join(word.capitalize() for word in words)


def _name_of(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("name")
    return getattr(value, "name", None)


def _plugin_union(section: str, registries: Registries) -> Any:
    members, models = [], []
    for entry in registries.of(section):
        params = entry.params or PluginParams
        model = create_model(
            _section_class_name(section, entry.name),
            __base__=params,
            __doc__=f"The {section} {entry.name!r} ({entry.plugin}). {params.__doc__ or ''}".strip(),
            name=(Literal[entry.name], Field(description=f"Selects the {section} {entry.name!r}.")),
            **(_BACKEND_FIELDS if section == "backend" else {}),
        )
        models.append(model)
        members.append(Annotated[model, Tag(entry.name)])
    if not members:
        return PluginSection
    if len(models) == 1:  # a union of one member is refused by some pydantic versions
        return models[0]
    return Annotated[Union[tuple(members)], Discriminator(_name_of)]


# Built models by the registries they were built from (kept alive with them, so ids stay unique).
_BUILT: dict[int, tuple[Any, type[RunConfig]]] = {}


def config_model(registries: Registries) -> type[RunConfig]:
    """``RunConfig`` with each plugin section validated by the registered params models; built
    once per registries object (building takes a good part of a second)."""
    sections = (*PLUGIN_SECTIONS, "logger")
    key = (id(registries), tuple(tuple(registries.of(section).names()) for section in sections))
    cached = _BUILT.get(hash(key))
    if cached is not None and cached[0] is registries:
        return cached[1]
    if len(_BUILT) >= 16:
        _BUILT.clear()
    model = _build_config_model(registries)
    _BUILT[hash(key)] = (registries, model)
    return model


def _build_config_model(registries: Registries) -> type[RunConfig]:
    fields: dict[str, Any] = {}
    for section, default_name in PLUGIN_SECTIONS.items():
        fields[section] = (
            _plugin_union(section, registries),
            Field(
                default={"name": default_name},
                validate_default=True,
                description=RunConfig.model_fields[section].description,
            ),
        )
    model = create_model("RunConfig", __base__=RunConfig, **fields)
    model.plugin_names = {section: registries.of(section).names() for section in PLUGIN_SECTIONS}
    model.logger_names = registries.logger.names()
    return model
