"""Benchmarks evaluated during training: `[eval] benchmarks` every `eval.every` steps on a fixed
subset, logged beside the training metrics; bad names refused before anything runs. On the tiny
backend and the generated miniature benchmark files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opsd_core.components import build_components
from opsd_core.config import load_config
from opsd_core.errors import ConfigError
from opsd_core.evaluation.benchmarks import benchmark_tasks
from opsd_core.evaluation.miniature import write_miniature_benchmarks
from opsd_core.evaluation.periodic import benchmark_probe, fixed_subset
from opsd_core.rundir import MetricsLog
from opsd_core.trainer.trainer import Trainer

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"
SMALL = [
    "train.samples_per_step=2", "train.grad_accum=1", "schedule.total_steps=4", "schedule.warmup_steps=1",
    "train.checkpoint_every=0", "train.log_every=3", "sampling.max_completion_tokens=6", "backend.free_text='skip'",
]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_miniature_benchmarks(tmp_path_factory.mktemp("benchmarks"), per_benchmark=4)


def _config(root, *overrides):
    evaluation = ["eval.benchmarks=['vsp', 'sat']", "eval.every=2", "eval.subset=2", f"eval.data_root='{root}'"]
    return load_config(QUICKSTART, [*SMALL, *evaluation, *overrides])


def test_the_subsets_are_answered_every_n_steps_and_logged_beside_the_step_metrics(root, tmp_path):
    config = _config(root)
    components, probe = build_components(config), benchmark_probe(config)
    vsp = [item.index for item in probe.items["vsp"]]
    assert len(vsp) == 2 and vsp == sorted(vsp)
    assert vsp == [item.index for item in benchmark_probe(config).items["vsp"]]  # fixed
    sat = {item.index % 1_000_000 for item in probe.items["sat"]}
    assert len(sat) == 2 and len(probe.items["sat"]) == 4  # each question with its rotated copy
    torch.manual_seed(0)
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    trainer = Trainer(components, components.backend.build_model(), tmp_path / "opsd", metrics)
    assert trainer.benchmarks.items == probe.items  # a trainer built without one reads the config's
    trainer.fit(progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 3, 4]  # log_every = 3, and every evaluation step
    for row in rows:
        evaluated = row["step"] % 2 == 0
        assert ("benchmark/vsp" in row) == evaluated and ("benchmark/sat" in row) == evaluated, row
        assert "loss" in row  # beside the step's own scalars
        if evaluated:
            assert 0 <= row["benchmark/vsp"] <= 100 and row["benchmark_s"] > 0


def test_the_same_questions_are_drawn_every_time():
    class Circular:
        circular = True

    class Plain:
        circular = False

    class Item:
        def __init__(self, index):
            self.index = index

    items = [Item(i) for i in range(10)] + [Item(i + 1_000_000) for i in range(10)]
    first = fixed_subset(Circular(), items, 3, seed=7)
    assert [i.index for i in first] == [i.index for i in fixed_subset(Circular(), items, 3, seed=7)]
    assert len(first) == 6 and {i.index % 1_000_000 for i in first} == {i.index for i in first if i.index < 1_000_000}
    plain = fixed_subset(Plain(), items, 3, seed=7)
    assert len(plain) == 3 and plain == sorted(plain, key=items.index)  # file order
    assert len(fixed_subset(Plain(), items, 50, seed=7)) == 20


def test_an_unknown_benchmark_is_refused_with_a_suggestion_before_anything_runs(root):
    with pytest.raises(ConfigError) as raised:
        _config(root, "eval.benchmarks=['vps']")
    message = str(raised.value)
    assert "eval: unknown benchmark 'vps' in benchmarks; known tasks: blink" in message and "Did you mean 'vsp'?" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="task 'frozen-lake' is not a benchmark; known benchmarks: blink"):
        benchmark_probe(_config(root, "eval.benchmarks=['frozen-lake']"))
    with pytest.raises(ConfigError, match="set eval.every"):
        load_config(QUICKSTART, ["eval.benchmarks=['vsp']", f"eval.data_root='{root}'"])
    with pytest.raises(ConfigError, match="set eval.data_root"):
        load_config(QUICKSTART, ["eval.benchmarks=['vsp']", "eval.every=2"])
    with pytest.raises(FileNotFoundError, match="VSP_maze_task_main_original.tsv"):
        benchmark_probe(_config(root, f"eval.data_root='{root / 'nowhere'}'"))


def test_benchmark_tasks_are_found_by_name():
    assert list(benchmark_tasks("vsp,cv-bench")) == ["vsp", "cv-bench"]
    assert {"vsp", "sat", "cv-bench"} <= set(benchmark_tasks("all")) and "frozen-lake" not in benchmark_tasks("all")
    from opsd_core.plugins import build_plugin_manager, fill_registries

    without_plugins = fill_registries(build_plugin_manager({"OPSD_LOAD_PLUGINS": ""}))
    with pytest.raises(ConfigError, match="no benchmark task is installed"):
        benchmark_tasks("all", without_plugins)


def test_opsd_run_stops_on_a_missing_benchmark_file_before_any_model_is_built(root, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from opsd_core.cli import cli
    from opsd_core.trainer import sharding

    def no_model(*arguments, **keywords):
        raise AssertionError("the start model was built")

    monkeypatch.setattr(sharding, "build_start", no_model)
    arguments = ["run", str(QUICKSTART), "--no-progress", "--set", f"run.output_dir='{tmp_path}'"]
    for override in [*SMALL, "eval.benchmarks=['vsp']", "eval.every=2", f"eval.data_root='{tmp_path / 'nowhere'}'"]:
        arguments += ["--set", override]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert "benchmark 'vsp' needs VSP_maze_task_main_original.tsv" in result.output
