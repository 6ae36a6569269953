"""`opsd run` end to end on the emu3 debug flavour: diagnostics, OPSD with visual thoughts drawn
by the model as image tokens, and the report, on a CPU (the noise control is left to the example run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_thinkmorph.demo_data import write_demo_dataset

DEBUG_CONFIG = str(Path(__file__).resolve().parents[3] / "examples" / "emu3-debug.toml")
FAST = ("eval.limit=2", "diagnostics.kl_samples=2", "experiment.noise_control=false")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu3")
    data = write_demo_dataset(root / "data", rows_per_dataset=4, side=56)
    overrides = [f"run.output_dir='{root}'", f"task.root='{data}'", *FAST]
    arguments = ["run", DEBUG_CONFIG, "--no-progress", *[part for o in overrides for part in ("--set", o)]]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    return root / "emu3-debug", result.output


def test_every_phase_ran_and_wrote_its_files(finished_run):
    directory, _ = finished_run
    for name in ("config.toml", "metrics.jsonl", "results.json", "report.md"):
        assert (directory / name).is_file(), name
    assert {"start", "opsd"} <= set(json.loads((directory / "results.json").read_text()))


def test_training_steps_drew_visual_thoughts_and_moved_the_student(finished_run):
    directory, _ = finished_run
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    opsd = [line for line in lines if line.get("phase") == "opsd" and "loss" in line]
    assert [line["step"] for line in opsd] == [1, 2, 3]
    assert all(line["visual_thought_s"] > 0 for line in opsd), "no visual thought was drawn"
    assert all(line["loss"] >= 0 and line["grad_norm"] > 0 for line in opsd)


def test_the_checkpoint_loads_alone(finished_run):
    from opsd_emu3.backend import Emu3Backend
    from opsd_emu3.config import Emu3Params

    directory, _ = finished_run
    steps = sorted((directory / "opsd" / "checkpoints").glob("step-*"))
    assert steps, "no checkpoint written"
    student = steps[-1] / "student"
    backend = Emu3Backend(Emu3Params(checkpoint=str(student), checkpoint_kind="gen", image_min_pixels=256, image_max_pixels=1024, vt_grid=(4, 4)))
    assert sum(p.numel() for p in backend.build_model().parameters()) > 0
