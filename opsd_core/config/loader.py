"""Reading, overriding, validating and writing run configs.

Owns: TOML files, ``--set section.field=value`` overrides (values parsed as TOML literals),
the precedence default < file < override, and turning validation failures into one readable
:class:`ConfigError` naming each bad field, its value and what is allowed.
Does not know: torch, or what the settings mean.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from opsd_core.config.model import PLUGIN_SECTIONS, RunConfig, config_model
from opsd_core.errors import ConfigError, closest_match


def read_toml(path: str | Path) -> dict[str, Any]:
    """The table in a TOML file; ConfigError if it is missing or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {error.start} cannot be decoded); save it as UTF-8"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {str(path)!r}: {error.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def parse_override(override: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value); the value is a TOML literal, else a plain string."""
    key, sep, raw = override.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"override {override!r} must look like section.field=value")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with each override applied in order."""
    result = copy.deepcopy(dict(data))
    for override in overrides:
        path, value = parse_override(override)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"override {override!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return result


def _registries() -> Any:
    from opsd_core.plugins import get_registries

    return get_registries()


def validate_config(data: Mapping[str, Any], registries: Any = None, source: str = "config") -> RunConfig:
    """Validate a config table into a :class:`RunConfig`; ConfigError listing every problem."""
    model = config_model(registries or _registries())
    data = dict(data)
    for section, default_name in PLUGIN_SECTIONS.items():
        if isinstance(data.get(section), dict) and "name" not in data[section]:
            data[section] = {"name": default_name, **data[section]}
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, model, source)) from None


def load_config(
    path: str | Path | None = None, overrides: Iterable[str] = (), registries: Any = None
) -> RunConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides``; validated."""
    data = read_toml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return validate_config(data, registries, source=str(path) if path is not None else "config")


def flat_fields(table: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config table as ``{"section.field": value}`` (nested sections joined by dots)."""
    if not isinstance(table, dict):
        return {prefix: table}
    fields: dict[str, Any] = {}
    for key, value in table.items():
        fields |= flat_fields(value, f"{prefix}.{key}" if prefix else key)
    return fields


def config_changes(before: BaseModel, after: BaseModel) -> dict[str, tuple[Any, Any]]:
    """``{"section.field": (old, new)}`` for every resolved value that differs between two configs."""
    old, new = flat_fields(before.model_dump(mode="json")), flat_fields(after.model_dump(mode="json"))
    return {key: (old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)}


def to_toml(config: BaseModel) -> str:
    """The resolved config as TOML (None values are left out: TOML has no null)."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, list[str]]:
    """The model class that owns the last element of ``loc``, and ``loc`` as the user wrote it
    (with union tags taken out)."""
    shown: list[str] = []
    current: Any = model
    index = 0
    while index < len(loc) - 1 and current is not None:
        part = loc[index]
        shown.append(str(part))
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None, shown + [str(p) for p in loc[index + 1 :]]
        annotation = field.annotation
        single = isinstance(annotation, type) and issubclass(annotation, BaseModel)  # one registered entry
        if part in PLUGIN_SECTIONS and not single and index + 1 < len(loc) - 1 and isinstance(loc[index + 1], str):
            current = _union_member(annotation, loc[index + 1])
            index += 2
            continue
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        index += 1
    shown.append(str(loc[-1]) if loc else "")
    return current, shown


def _union_member(annotation: Any, tag: str) -> type[BaseModel] | None:
    from typing import get_args

    for member in get_args(annotation):
        fields = getattr(member, "model_fields", {})
        name_field = fields.get("name")
        if name_field is not None and get_args(name_field.annotation) == (tag,):
            return member
    return None


#: Settings that moved between sections: (section, key) -> where it lives now. Devices,
#: threads and precision are run-wide, never a backend's own.
MOVED = {
    ("backend", "device"): "run.device",
    ("backend", "dtype"): "run.precision (models that train keep fp32 masters; 'bf16' computes in bf16)",
    ("backend", "threads"): "run.threads",
    ("train", "mixed_precision"): "run.precision ('bf16' is FSDP's bf16 mixed precision in multi-process runs)",
}


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> str:
    """One message: a line per problem with the field, the bad value and what is allowed."""
    lines = []
    for item in error.errors():
        kind = item["type"]
        owner, shown = _model_at(model, tuple(item["loc"]))
        field = ".".join(part for part in shown if part) or "(top level)"
        value = item.get("input")
        if kind == "extra_forbidden" and (shown[0], shown[-1]) in MOVED and len(shown) == 2:
            message = f"this setting moved to {MOVED[shown[0], shown[-1]]}"
        elif kind == "extra_forbidden":
            allowed = sorted(owner.model_fields) if owner is not None else []
            message = f"unknown key {shown[-1]!r}"
            close = closest_match(shown[-1], allowed)
            if close:
                message += f" (did you mean {close!r}?)"
            message += f"; allowed keys: {', '.join(allowed)}"
        elif kind in ("union_tag_invalid", "union_tag_not_found") or (
            kind == "literal_error" and len(shown) == 2 and shown[0] in PLUGIN_SECTIONS and shown[1] == "name"
        ):
            section = shown[0]
            expected = getattr(model, "plugin_names", {}).get(section, [])
            name = value if kind == "literal_error" else _name_of(value)
            if name is None:
                message = f"missing 'name'; choose one of: {', '.join(expected)}"
            else:
                message = f"unknown {section} {name!r}; known {section}s: {', '.join(expected) or '(none)'}"
                close = closest_match(str(name), expected)
                if close:
                    message += f". Did you mean {close!r}?"
            field = f"{section}.name"
            value = None
        elif kind == "value_error":  # a validator's own sentence, without pydantic's "Value error, "
            message = str(item["ctx"]["error"])
        else:
            message = item["msg"]
        if value is not None and kind not in ("missing", "extra_forbidden") and not isinstance(value, dict):
            message += f" (got {value!r})"
        lines.append(f"{field}: {message}")
    if len(lines) == 1:
        return f"invalid {source}: {lines[0]}"
    return f"invalid {source} ({len(lines)} problems):\n" + "\n".join(f"  - {line}" for line in lines)


def _name_of(value: Any) -> Any:
    return value.get("name") if isinstance(value, dict) else None
