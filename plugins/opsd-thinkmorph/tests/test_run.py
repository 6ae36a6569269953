"""`opsd run` end to end on the thinkmorph debug flavour: diagnostics, OPSD with visual thoughts
drawn by the model, the noise control, evaluation and the report, on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd_core.testing.runs import run_config_file
from opsd_thinkmorph.demo_data import write_demo_dataset

DEBUG_CONFIG = Path(__file__).resolve().parents[3] / "examples" / "thinkmorph-debug.toml"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("thinkmorph")
    data = write_demo_dataset(root / "data", rows_per_dataset=4, side=56)
    return run_config_file(DEBUG_CONFIG, root, [f"task.root='{data}'"])


def test_every_phase_ran_and_wrote_its_files(finished_run):
    assert finished_run.missing_files() == []
    assert {"start", "opsd", "noise"} <= set(finished_run.results())


def test_training_steps_drew_visual_thoughts_and_moved_the_student(finished_run):
    opsd = finished_run.step_metrics("opsd")
    assert [line["step"] for line in opsd] == [1, 2, 3]
    assert all(line["visual_thought_s"] > 0 for line in opsd), "no visual thought was drawn"
    assert all(line["loss"] >= 0 and line["grad_norm"] > 0 for line in opsd)
    noise = finished_run.step_metrics("noise")
    assert noise and all(line["visual_thought_s"] == 0 for line in noise), "the noise control needs no drawing"


def test_the_checkpoint_keeps_trainable_tensors_and_loads_over_its_start(finished_run):
    import torch

    from opsd_thinkmorph.backend import ThinkMorphBackend
    from opsd_thinkmorph.config import ThinkMorphParams

    checkpoint = finished_run.latest_checkpoint("opsd")
    assert sorted(path.name for path in (checkpoint / "student").iterdir()) == ["trainable.safetensors"]
    record = json.loads((checkpoint / "start.json").read_text())
    assert record["path"] is None and record["sha256"] is None  # the debug flavour: its seed fixes the weights
    assert record["frozen"] and all("_moe_gen" in name or name.startswith(("time_embedder", "vae2llm", "llm2vae")) for name in record["frozen"])
    params = {key: value for key, value in record["backend"].items() if key not in ("name", "lora")}
    backend = ThinkMorphBackend(ThinkMorphParams(**params))
    start, model = backend.build_model(), finished_run.checkpoint_model(backend)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, start.get_parameter(name))}
    assert moved and not moved & set(record["frozen"])
