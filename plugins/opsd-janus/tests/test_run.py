"""`opsd run` end to end on the janus-pro debug flavour: diagnostics, OPSD with visual thoughts
drawn by the model's VQ image head, the noise control, evaluation and the report, on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from opsd_thinkmorph.demo_data import write_demo_dataset

from opsd_core.testing.runs import run_config_file

DEBUG_CONFIG = Path(__file__).resolve().parents[3] / "examples" / "janus-pro-debug.toml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("janus")
    data = write_demo_dataset(root / "data", rows_per_dataset=4, side=56)
    return run_config_file(DEBUG_CONFIG, root, [f"task.root='{data}'", "run.threads=1"])  # threads: see conftest.py


def test_every_phase_ran_and_wrote_its_files(finished_run):
    assert finished_run.missing_files() == []
    assert {"start", "opsd", "noise"} <= set(finished_run.results())


def test_training_steps_drew_visual_thoughts_and_moved_the_student(finished_run):
    opsd = finished_run.step_metrics("opsd")
    assert [line["step"] for line in opsd] == [1, 2, 3]
    assert all(line["visual_thought_s"] > 0 for line in opsd), "no visual thought was drawn"
    assert all(line["loss"] >= 0 and line["grad_norm"] > 0 for line in opsd)


def test_the_checkpoint_loads_alone(finished_run):
    import torch
    from opsd_janus.backend import JanusBackend
    from opsd_janus.config import JanusParams

    student = finished_run.latest_checkpoint("opsd") / "student"
    backend = JanusBackend(JanusParams(checkpoint=str(student), image_size=32))
    model = backend.build_model()
    debug = JanusBackend(JanusParams(flavour="debug", image_size=32)).build_model()
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, debug.get_parameter(name))]
    assert moved, "the saved student equals the initial weights: training changed nothing"
