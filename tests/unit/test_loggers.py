"""Loggers: the registry and `opsd list loggers`, config errors, the tracker files read back,
and closing on a crash."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_core.config import load_config
from opsd_core.errors import ConfigError
from opsd_core.interfaces import Logger, MediaSample
from opsd_core.loggers.group import Loggers, check_loggers, open_loggers
from opsd_core.plugins import get_registries
from opsd_core.registry import Registry
from opsd_core.rundir import MetricsLog

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"


def _sample():
    import torch

    return MediaSample("p-0", ("U", "c1", "⏎"), (0.5, 0.0, 1.25), torch.rand(3, 8, 8), True)


def test_the_built_in_loggers_are_listed():
    assert {"jsonl", "tensorboard", "wandb"} <= set(get_registries().logger.names())
    result = CliRunner().invoke(cli, ["list", "loggers"])
    assert result.exit_code == 0 and "tensorboard" in result.output and "wandb" in result.output


def test_an_unknown_logger_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown logger 'tensorbord'.*Did you mean 'tensorboard'"):
        load_config(QUICKSTART, ['logging.loggers=["jsonl", "tensorbord"]'])


def test_a_missing_tracker_package_is_one_line_naming_it_and_the_pip_command():
    class NeedsAbsentPackage(Logger):
        packages = ("opsd-no-such-tracker",)

    registry = Registry("logger")
    registry.add("jsonl", "opsd_core.loggers.jsonl:JsonlLogger")
    registry.add("absent", NeedsAbsentPackage)
    with pytest.raises(ConfigError) as error:
        check_loggers(["absent"], registry)
    message = str(error.value)
    assert "\n" not in message and "'opsd-no-such-tracker'" in message and "pip install opsd-no-such-tracker" in message


def test_tensorboard_event_file_holds_the_scalars_config_and_media(tmp_path):
    pytest.importorskip("tensorboard", reason="the opsd-core[trackers] extra (the dev install has it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from opsd_core.loggers.tensorboard_logger import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path)
    logger.log_config({"run": {"name": "x"}})
    for step in (1, 2):
        logger.log_scalars("opsd", step, {"loss": 0.5 / step, "lr": 1e-3})
    logger.log_results("opsd", 2, {"student_accuracy": 0.75})
    logger.log_media("opsd", 2, [_sample()], "<html></html>")
    logger.close()
    events = EventAccumulator(str(tmp_path / "trackers" / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("opsd/loss")] == [(1, 0.5), (2, 0.25)]
    assert events.Scalars("opsd/eval/student_accuracy")[0].value == 0.75
    tags = events.Tags()
    assert "opsd/visual_thought/p-0" in tags["images"]
    assert {"config/text_summary", "opsd/completions/text_summary"} <= set(tags["tensors"])


def test_wandb_runs_offline_in_the_run_directory_and_records_the_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the opsd-core[trackers] extra (the dev install has it)")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    from opsd_core.loggers.wandb_logger import WandbLogger

    logger = WandbLogger(tmp_path / "my-run")
    logger.log_config({"run": {"name": "my-run"}})
    logger.log_scalars("opsd", 1, {"loss": 0.4375})
    logger.log_results("opsd", 1, {"student_accuracy": 0.8125})
    logger.log_media("opsd", 1, [_sample()], "<html><body>tokens</body></html>")
    logger.close()
    runs = list((tmp_path / "my-run" / "trackers" / "wandb").rglob("offline-run-*"))
    assert len(runs) == 1, "an offline run, never an online one"
    records = b"".join(path.read_bytes() for path in runs[0].glob("*.wandb"))
    for key in (b"opsd/loss", b"0.4375", b"opsd/eval/student_accuracy", b"0.8125", b"my-run"):
        assert key in records, key
    assert list(runs[0].rglob("*.html")), "the media page is stored with the run"


def test_the_jsonl_logger_writes_metric_lines_and_media_pages(tmp_path):
    group = Loggers.of_metrics(MetricsLog(tmp_path / "metrics.jsonl"))
    group.log_scalars("opsd", 5, {"loss": 0.125})
    group.log_results("opsd", 5, {"student_accuracy": 1.0})
    group.log_media("opsd", 5, [_sample()], "<html>page</html>")
    group.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"phase": "opsd", "step": 5, "loss": 0.125}
    ]
    assert (tmp_path / "media" / "opsd-step-0000005.html").read_text() == "<html>page</html>"


class _Recording(Logger):
    closed: list[str] = []

    def __init__(self, run_dir, config):
        self.name = "recording"

    def log_config(self, config):
        pass

    def log_scalars(self, phase, step, scalars):
        pass

    def log_results(self, phase, step, results):
        pass

    def log_media(self, phase, step, samples, html):
        pass

    def close(self):
        _Recording.closed.append(self.name)


def test_loggers_are_closed_when_the_run_crashes_and_only_rank_0_builds_them(tmp_path):
    registry = Registry("logger")
    registry.add("jsonl", "opsd_core.loggers.jsonl:JsonlLogger")
    registry.add("recording", _Recording)
    config = load_config(QUICKSTART, [])
    config.logging.loggers = ["recording"]
    _Recording.closed.clear()
    with pytest.raises(RuntimeError, match="crash"):
        with open_loggers(config, tmp_path, registry) as group:
            assert [type(logger).__name__ for logger in group.loggers] == ["JsonlLogger", "_Recording"]
            raise RuntimeError("crash")
    assert _Recording.closed == ["recording"]
    with open_loggers(config, tmp_path, registry, is_main=False) as group:
        assert group.loggers == []


def test_opsd_run_stops_before_anything_runs_when_a_tracker_is_not_installed(tmp_path, monkeypatch):
    import opsd_core.loggers.group as group

    real = group.importlib.util.find_spec
    monkeypatch.setattr(group.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    arguments = ["run", str(QUICKSTART), "--set", f"run.output_dir='{tmp_path}'", "--set", 'logging.loggers=["wandb"]']
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code != 0
    assert "'wandb' logger needs the package 'wandb'" in result.output and "pip install wandb" in result.output
    assert not (tmp_path / "quickstart").exists()
