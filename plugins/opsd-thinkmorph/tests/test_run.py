"""`opsd run` end to end on the thinkmorph debug flavour: diagnostics, OPSD with visual thoughts
drawn by the model, the noise control, evaluation and the report, on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_thinkmorph.demo_data import write_demo_dataset

DEBUG_CONFIG = str(Path(__file__).resolve().parents[3] / "examples" / "thinkmorph-debug.toml")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("thinkmorph")
    data = write_demo_dataset(root / "data", rows_per_dataset=4, side=56)
    arguments = ["run", DEBUG_CONFIG, "--no-progress", "--set", f"run.output_dir='{root}'", "--set", f"task.root='{data}'"]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    return root / "thinkmorph-debug", result.output


def test_every_phase_ran_and_wrote_its_files(finished_run):
    directory, output = finished_run
    for name in ("config.toml", "metrics.jsonl", "results.json", "report.md"):
        assert (directory / name).is_file(), name
    results = json.loads((directory / "results.json").read_text())
    assert {"start", "opsd", "noise"} <= set(results), results.keys()


def test_training_steps_drew_visual_thoughts_and_moved_the_student(finished_run):
    directory, _ = finished_run
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    opsd = [line for line in lines if line.get("phase") == "opsd" and "loss" in line]
    assert [line["step"] for line in opsd] == [1, 2, 3]
    assert all(line["visual_thought_s"] > 0 for line in opsd), "no visual thought was drawn"
    assert all(line["loss"] >= 0 and line["grad_norm"] > 0 for line in opsd)
    noise = [line for line in lines if line.get("phase") == "noise" and "loss" in line]
    assert noise and all(line["visual_thought_s"] == 0 for line in noise), "the noise control needs no drawing"


def test_the_checkpoint_loads_alone(finished_run, tmp_path):
    from opsd_thinkmorph.backend import ThinkMorphBackend
    from opsd_thinkmorph.config import ThinkMorphParams

    directory, _ = finished_run
    steps = sorted((directory / "opsd" / "checkpoints").glob("step-*"))
    assert steps, "no checkpoint written"
    student = next(path for path in steps[-1].iterdir() if path.is_dir() and (path / "llm_config.json").exists())
    backend = ThinkMorphBackend(ThinkMorphParams(checkpoint=str(student), vit_max_size=56, vit_min_size=28))
    model = backend.build_model()
    assert sum(p.numel() for p in model.parameters()) > 0
