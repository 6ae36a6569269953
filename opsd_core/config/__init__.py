"""Typed run configuration (pydantic v2, TOML). Importing this package never imports torch."""

from opsd_core.config.base import PluginParams, Section
from opsd_core.config.loader import (
    apply_overrides,
    config_changes,
    flat_fields,
    load_config,
    parse_override,
    read_toml,
    to_toml,
    validate_config,
)
from opsd_core.config.model import (
    PLUGIN_SECTIONS,
    RunConfig,
    config_model,
    lora_settings,
)
from opsd_core.config.sections import (
    DiagnosticsSection,
    EvalSection,
    ExperimentSection,
    LoraSection,
    OptimSection,
    PluginSection,
    RunSection,
    SamplingSection,
    ScheduleSection,
    TrainSection,
)

__all__ = [
    "config_changes",
    "flat_fields",
    "PLUGIN_SECTIONS",
    "DiagnosticsSection",
    "EvalSection",
    "ExperimentSection",
    "LoraSection",
    "OptimSection",
    "PluginParams",
    "PluginSection",
    "RunConfig",
    "RunSection",
    "SamplingSection",
    "ScheduleSection",
    "Section",
    "TrainSection",
    "apply_overrides",
    "config_model",
    "load_config",
    "lora_settings",
    "parse_override",
    "read_toml",
    "to_toml",
    "validate_config",
]
