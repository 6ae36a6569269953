"""`opsd run` end to end on the emu3 debug flavour: diagnostics, OPSD with visual thoughts drawn
by the model as image tokens, and the report, on a CPU (the noise control is left to the example run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd_core.testing.runs import run_config_file
from opsd_thinkmorph.demo_data import write_demo_dataset

DEBUG_CONFIG = Path(__file__).resolve().parents[3] / "examples" / "emu3-debug.toml"
FAST = ("eval.limit=2", "diagnostics.kl_samples=2", "experiment.noise_control=false")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("emu3")
    data = write_demo_dataset(root / "data", rows_per_dataset=4, side=56)
    return run_config_file(DEBUG_CONFIG, root, [f"task.root='{data}'", *FAST])


def test_every_phase_ran_and_wrote_its_files(finished_run):
    assert finished_run.missing_files() == []
    assert {"start", "opsd"} <= set(finished_run.results())


def test_training_steps_drew_visual_thoughts_and_moved_the_student(finished_run):
    opsd = finished_run.step_metrics("opsd")
    assert [line["step"] for line in opsd] == [1, 2, 3]
    assert all(line["visual_thought_s"] > 0 for line in opsd), "no visual thought was drawn"
    assert all(line["loss"] >= 0 and line["grad_norm"] > 0 for line in opsd)


def test_the_checkpoint_loads_alone(finished_run):
    from opsd_emu3.backend import Emu3Backend
    from opsd_emu3.config import Emu3Params

    student = finished_run.latest_checkpoint("opsd") / "student"
    backend = Emu3Backend(Emu3Params(checkpoint=str(student), checkpoint_kind="gen", image_min_pixels=256, image_max_pixels=1024, vt_grid=(4, 4)))
    assert sum(p.numel() for p in backend.build_model().parameters()) > 0
