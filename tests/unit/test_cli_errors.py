"""What the command line prints when something fails that is not a framework error: one line,
a non-zero exit, and the full traceback in a file the line names (a likely bug, or the
operating system refusing a file operation)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core import plugins
from opsd_core.cli import cli


def _failing(error):
    def plugin_info(*args, **kwargs):
        raise error

    return plugin_info


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("index out of range in the sampler"), "unexpected RuntimeError: index out of range"),
        (PermissionError(13, "Permission denied", "/runs/x/metrics.jsonl"), "Permission denied (/runs/x/metrics.jsonl)"),
        (OSError(28, "No space left on device"), "No space left on device: the operating system refused"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "CUDA ran out of memory: the model and its"),
    ],
)
def test_unexpected_failures_are_one_line_with_the_traceback_logged(monkeypatch, error, expected):
    monkeypatch.setattr(plugins, "plugin_info", _failing(error))
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.output
    log = Path(re.search(r"(/\S+opsd-error-\S+\.log)", lines[0]).group(1))
    assert "Traceback" in log.read_text() and type(error).__name__ in log.read_text()
    log.unlink()


def test_a_config_given_with_resume_is_refused_not_ignored(tmp_path):
    (tmp_path / "config.toml").write_text("")
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "other.toml"), "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "--resume continues with the run's own config.toml, so CONFIG" in result.output
