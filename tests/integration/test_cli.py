"""The `opsd` command line: light imports, listings, validation and clear errors."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core.cli import cli

REPO = Path(__file__).resolve().parents[2]


def _opsd(*args, env=None):
    environment = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", "from opsd_core.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=environment,
    )


LIGHT_COMMANDS = [
    ["--help"],
    ["list", "divergences"],
    ["list", "backends"],
    ["list", "samplers"],
    ["examples"],
    ["validate", str(REPO / "tests" / "integration" / "data" / "valid.toml")],
    ["config", "show"],
    ["plugins"],
    ["plan", "--help"],
    ["sweep", "--help"],
    ["compare", "--help"],
]


@pytest.mark.parametrize("args", LIGHT_COMMANDS, ids=lambda args: " ".join(args[:2]))
def test_light_commands_import_neither_torch_nor_model_code(args):
    code = (
        "import sys\n"
        "from opsd_core.cli import cli\n"
        "try:\n"
        f"    cli.main({args!r}, standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers', 'safetensors')\n"
        "               or (m.split('.')[-1] in ('backend', 'model') and not m.startswith('opsd_core.')))\n"
        "assert not heavy, heavy[:10]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("plugins", "list", "validate", "config"):
        assert command in result.output


def test_list_divergences_and_teachers():
    runner = CliRunner()
    divergences = runner.invoke(cli, ["list", "divergences", "--json"])
    names = {row["name"] for row in json.loads(divergences.output)}
    assert {"jsd", "kl", "reverse-kl", "total-variation"} <= names
    teachers = runner.invoke(cli, ["list", "teachers"])
    assert teachers.exit_code == 0 and "ema" in teachers.output and "frozen" in teachers.output


def test_plugins_prints_json_for_every_plugin():
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    plugins = {item["name"]: item for item in json.loads(result.output)}
    assert plugins["opsd-core"]["version"]
    assert "register_divergences" in plugins["opsd-core"]["hooks"]
    assert plugins["example"]["distribution"] == "opsd-example-plugin"


def test_validate_and_config_show_resolve_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[optim]\nlr = 3e-4\n[divergence]\nname = 'jsd'\ntop_k = 8\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["validate", str(path), "--set", "train.grad_accum=4"])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    shown = runner.invoke(cli, ["config", "show", str(path), "--set", "divergence.beta=0.25"])
    resolved = tomllib.loads(shown.output)
    assert resolved["optim"]["lr"] == 3e-4 and resolved["divergence"]["beta"] == 0.25
    assert resolved["divergence"]["top_k"] == 8 and resolved["optim"]["eps"] == 1e-15


def test_config_schema_is_json_with_plugin_fields():
    result = CliRunner().invoke(cli, ["config", "schema"])
    schema = json.loads(result.output)
    assert "properties" in schema and "divergence" in schema["properties"]
    assert "clip_mode" in result.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["validate", "no/such/file.toml"], "does not exist"),
        (["config", "show", "--set", "optim.lr=-1"], "optim.lr"),
        (["config", "show", "--set", "divergence.name=jds"], "Did you mean 'jsd'"),
        (["config", "show", "--set", "bogus"], "section.field=value"),
    ],
)
def test_errors_exit_nonzero_with_one_clear_line(args, fragment):
    result = _opsd(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and fragment in lines[0], result.stderr


def test_validate_changes_nothing_on_disk(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlr = 'fast'\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _opsd("validate", str(path)).returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert path.read_text() == "[optim]\nlr = 'fast'\n"


def test_recovery_without_external_plugins():
    result = _opsd("list", "divergences", env={"OPSD_LOAD_PLUGINS": ""})
    assert result.returncode == 0
    assert "jsd" in result.stdout and "total-variation" not in result.stdout


def test_unknown_list_kind_is_a_usage_error():
    result = CliRunner().invoke(cli, ["list", "widgets"])
    assert result.exit_code == 2 and "widgets" in result.output


def test_examples_lists_and_copies_the_shipped_configs_without_replacing_any(tmp_path):
    runner = CliRunner()
    listed = runner.invoke(cli, ["examples"])
    assert listed.exit_code == 0
    assert "quickstart" in listed.output and "thinkmorph-8xh800" in listed.output
    copied = runner.invoke(cli, ["examples", "--copy", str(tmp_path / "configs")])
    assert copied.exit_code == 0, copied.output
    assert (tmp_path / "configs" / "quickstart.toml").read_text() == (REPO / "examples" / "quickstart.toml").read_text()
    (tmp_path / "configs" / "quickstart.toml").write_text("# mine\n")
    again = runner.invoke(cli, ["examples", "--copy", str(tmp_path / "configs")])
    assert again.exit_code != 0 and "nothing was copied" in again.output
    assert (tmp_path / "configs" / "quickstart.toml").read_text() == "# mine\n"


def test_the_shipped_default_is_found_from_any_directory_and_a_local_copy_wins(tmp_path, monkeypatch):
    from opsd_core.cli.shipped import SHIPPED_CONFIGS, backend_config_path, default_config_path

    monkeypatch.chdir(tmp_path)
    assert default_config_path() == SHIPPED_CONFIGS / "quickstart.toml"
    assert backend_config_path("thinkmorph") == SHIPPED_CONFIGS / "thinkmorph.toml"
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "quickstart.toml").write_text("[run]\n")
    assert default_config_path() == tmp_path / "examples" / "quickstart.toml"
