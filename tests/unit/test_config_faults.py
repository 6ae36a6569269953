"""Bad config input ends in one ConfigError naming the field, never in a traceback or a run
that silently does something else; a fuzzer throws random tables at the validator."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd_core.config import RunConfig, load_config, read_toml, validate_config
from opsd_core.errors import ConfigError

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("divergence.beta=nan", "divergence"),
        ("schedule.min_lr=1.0", "schedule.min_lr"),
        ("run.seed=18446744073709551616", "run.seed"),
        ("schedule.total_steps=99999999999999", "schedule.total_steps"),
        ("run.threads=100000", "run.threads"),
        ("train.samples_per_step=10000000", "train.samples_per_step"),
        ("diagnostics.kl_samples=100000000", "diagnostics.kl_samples"),
        ("run.name='../../x'", "run.name"),
        ("run.name='/tmp/elsewhere'", "run.name"),
        ("run.name='.'", "run.name"),
        ("experiment.opsd=false", "noise_control"),
    ],
)
def test_out_of_range_values_are_one_clear_error(override, field):
    overrides = [override] + (["experiment.noise_control=false"] if "experiment.opsd" in override else [])
    with pytest.raises(ConfigError) as error:
        load_config(QUICKSTART, overrides)
    assert field in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.seed=true", "run.seed: Input should be a number, not true or false"),
        ("optim.grad_clip=false", "optim.grad_clip: Input should be a number, not true or false"),
        ("divergence.top_k=true", "divergence.top_k: Input should be a number, not true or false"),
        ("experiment.opsd='yes'", "experiment.opsd: Input should be true or false"),
        ("train.activation_checkpointing=1", "train.activation_checkpointing: Input should be true or false"),
    ],
)
def test_booleans_are_neither_numbers_nor_strings(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, [override])


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[run]\nname = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_toml(path)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_sections = sorted(RunConfig.model_fields)
_fields = {name: sorted(RunConfig.model_fields[name].annotation.model_fields) for name in ("run", "optim", "schedule", "train", "sampling", "eval", "diagnostics", "experiment")}


@st.composite
def config_tables(draw):
    table = {}
    for section in draw(st.lists(st.sampled_from(_sections + ["nonsense", "ünïcode"]), max_size=4, unique=True)):
        known = _fields.get(section, ["name", "beta", "top_k", "decay", "flavour", "sync_every", "system_prompt"])
        keys = draw(st.lists(st.sampled_from(known) | st.text(max_size=6), max_size=4, unique=True))
        table[section] = {key: draw(_values) for key in keys} if draw(st.booleans()) else draw(_values)
    return table


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(config_tables())
def test_any_table_is_a_valid_config_or_one_config_error(table):
    try:
        config = validate_config(table)
    except ConfigError as error:
        assert str(error).startswith("invalid config")
    else:
        assert isinstance(config, RunConfig)
