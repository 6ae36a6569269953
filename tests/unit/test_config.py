"""Typed config: precedence, overrides, plugin sections, and readable errors."""

import sys
from pathlib import Path

import pytest
from pydantic import Field

from opsd_core.config import (
    PluginParams,
    RunConfig,
    apply_overrides,
    config_model,
    load_config,
    parse_override,
    to_toml,
    validate_config,
)
from opsd_core.config.base import Section
from opsd_core.errors import ConfigError
from opsd_core.plugins import Registries


class ToyBackendParams(PluginParams):
    """Toy backend."""

    width: int = Field(8, description="Model width.", ge=1, le=64)
    checkpoint: str | None = Field(None, description="Local checkpoint directory.")


class ToyJsdParams(PluginParams):
    """Toy JSD."""

    beta: float = Field(0.5, description="Mixture weight.", ge=0, le=1)


@pytest.fixture
def registries():
    registries = Registries()
    registries.backend.add("tiny-umm", dict, ToyBackendParams)
    registries.backend.add("janus-pro", dict)
    registries.task.add("frozen-lake", dict)
    registries.divergence.add("jsd", dict, ToyJsdParams)
    registries.divergence.add("reverse-kl", dict)
    registries.teacher.add("ema", dict)
    return registries


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_validate_and_select_default_plugins(registries):
    config = load_config(registries=registries)
    assert config.backend.name == "tiny-umm" and config.backend.width == 8
    assert config.divergence.name == "jsd" and config.divergence.beta == 0.5
    assert config.optim.lr == 1e-5 and config.optim.eps == 1e-15 and config.train.grad_accum == 2
    assert config.schedule.warmup_steps == 200 and config.sampling.max_completion_tokens == 1024


def test_precedence_default_file_set(registries, tmp_path):
    path = _write(tmp_path, "[optim]\nlr = 3e-4\nweight_decay = 0.1\n[backend]\nname = 'tiny-umm'\nwidth = 16\n")
    config = load_config(path, ["optim.lr=1e-3", "backend.width=32"], registries=registries)
    assert config.optim.lr == 1e-3  # --set beats file
    assert config.optim.weight_decay == 0.1  # file beats default
    assert config.optim.grad_clip == 1.0  # default
    assert config.backend.width == 32


def test_a_section_without_name_keeps_the_default_plugin(registries):
    config = validate_config({"divergence": {"beta": 0.2}}, registries)
    assert config.divergence.name == "jsd" and config.divergence.beta == 0.2


def test_plugin_section_is_validated_by_the_plugins_model(registries):
    config = validate_config({"divergence": {"name": "reverse-kl"}}, registries)
    assert config.divergence.name == "reverse-kl"
    with pytest.raises(ConfigError) as info:
        validate_config({"divergence": {"name": "reverse-kl", "beta": 0.3}}, registries)
    assert "divergence.beta" in str(info.value) and "unknown key" in str(info.value)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"optim": {"lrr": 1}}, ["optim.lrr", "unknown key 'lrr'", "did you mean 'lr'", "allowed keys:"]),
        ({"train": {"grad_accum": "two"}}, ["train.grad_accum", "valid integer", "'two'"]),
        ({"sampling": {"temperature": -1.0}}, ["sampling.temperature", "greater than 0", "-1.0"]),
        ({"backend": {"name": "tiny-umm", "width": 1000}}, ["backend.width", "less than or equal to 64", "1000"]),
        ({"backend": {"name": "tiny-um"}}, ["backend.name", "unknown backend 'tiny-um'", "janus-pro, tiny-umm", "Did you mean 'tiny-umm'"]),
        ({"divergence": {"name": "jds"}}, ["divergence.name", "known divergences: jsd, reverse-kl", "Did you mean 'jsd'"]),
        ({"nonsense": {}}, ["nonsense", "unknown key", "allowed keys: backend, context, diagnostics, divergence"]),
        ({"schedule": {"warmup_steps": 20, "total_steps": 10}}, ["schedule", "must not exceed total_steps"]),
    ],
)
def test_bad_config_gives_one_readable_message(registries, data, expected):
    with pytest.raises(ConfigError) as info:
        validate_config(data, registries)
    message = str(info.value)
    assert message.startswith("invalid config")
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert "Traceback" not in message and "pydantic" not in message.lower()


def test_every_backend_section_takes_a_lora_table(registries, tmp_path):
    assert validate_config({}, registries).backend.lora is None
    for backend in ("tiny-umm", "janus-pro"):  # with and without a params model of its own
        data = {"backend": {"name": backend, "lora": {"rank": 8, "target_modules": ["q_proj"]}}}
        lora = validate_config(data, registries).backend.lora
        assert (lora.rank, lora.alpha, lora.dropout, lora.target_modules) == (8, 32.0, 0.0, ["q_proj"])
    config = validate_config({"backend": {"name": "tiny-umm", "lora": {"target_modules": ["qkv"]}}}, registries)
    path = tmp_path / "lora.toml"
    path.write_text(to_toml(config))
    assert load_config(path, registries=registries) == config
    for bad, fragments in [
        ({"rank": 8}, ["backend.lora.target_modules", "Field required"]),
        ({"target_modules": []}, ["backend.lora.target_modules", "at least 1"]),
        ({"target_modules": ["q"], "rank": 0}, ["backend.lora.rank", "greater than or equal to 1"]),
        ({"target_modules": ["q"], "dropout": 1.0}, ["backend.lora.dropout", "less than 1"]),
        ({"target_modules": ["q"], "r": 8}, ["backend.lora.r", "unknown key 'r'"]),
    ]:
        with pytest.raises(ConfigError) as info:
            validate_config({"backend": {"name": "tiny-umm", "lora": bad}}, registries)
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))


def test_several_problems_are_all_reported(registries):
    with pytest.raises(ConfigError, match=r"\(2 problems\)"):
        validate_config({"optim": {"lr": -1}, "train": {"grad_accum": 0}}, registries)


def test_override_values_are_toml_literals():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=3.5e-4") == (["a", "b"], 3.5e-4)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=[0.9, 0.95]") == (["a", "b"], [0.9, 0.95])
    assert parse_override("a.b='x y'") == (["a", "b"], "x y")
    assert parse_override("backend.name=tiny-umm") == (["backend", "name"], "tiny-umm")
    assert parse_override("a.b = 2") == (["a", "b"], 2)


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", ".a=1"])
def test_malformed_overrides_are_config_errors(bad):
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override(bad)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=2"])


def test_overrides_do_not_mutate_the_input():
    data = {"optim": {"lr": 1.0}}
    apply_overrides(data, ["optim.lr=2.0"])
    assert data == {"optim": {"lr": 1.0}}


def test_missing_and_malformed_files(registries, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", registries=registries)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[optim\nlr = 1"), registries=registries)


def test_toml_round_trip_is_exact(registries, tmp_path):
    config = load_config(None, ["optim.lr=0.003", "backend.checkpoint='ckpt/dir'"], registries=registries)
    text = to_toml(config)
    again = load_config(_write(tmp_path, text), registries=registries)
    assert again.model_dump() == config.model_dump()


def test_every_field_has_a_description_and_models_forbid_extra(registries):
    model = config_model(registries)
    seen = set()

    def visit(cls):
        if cls in seen:
            return
        seen.add(cls)
        assert cls.model_config.get("extra") in ("forbid", "allow"), cls
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no description"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Section):
                visit(annotation)

    visit(model)
    visit(RunConfig)
    assert len(seen) >= 6


def test_json_schema_includes_plugin_params(registries):
    schema = config_model(registries).model_json_schema()
    text = str(schema)
    assert "width" in text and "beta" in text and "Model width." in text


def test_config_package_does_not_import_torch():
    import subprocess

    code = "import sys, opsd_core.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
