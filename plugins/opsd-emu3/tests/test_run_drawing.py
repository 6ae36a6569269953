"""`opsd run` end to end on examples/emu3-draw.toml: Chat answers, a second checkpoint draws.

The example's two checkpoints are stood in for by the debug flavour's model saved twice with
different seeds (the answering one and the drawing one); everything that sizes the run (devices,
image sizes, caps, steps, evaluation) is taken from examples/emu3-debug.toml so it takes seconds
on a CPU. The example's own structure stays: checkpoint_kind 'chat', drawing_checkpoint, and
visual thoughts generated at every step.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w
from opsd_thinkmorph.demo_data import write_demo_dataset

from opsd_core.testing.runs import run_config_file

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
SIZES = ("image_min_pixels", "image_max_pixels", "vt_grid", "vt_top_k")
FAST = ("eval.limit=2", "diagnostics.kl_samples=2", "experiment.noise_control=false", "schedule.total_steps=2")


def debug_sized_example(answering: Path, drawing: Path) -> dict:
    """examples/emu3-draw.toml with the two checkpoints given and the debug example's sizes."""
    example = tomllib.loads((EXAMPLES / "emu3-draw.toml").read_text())
    debug = tomllib.loads((EXAMPLES / "emu3-debug.toml").read_text())
    for section, values in debug.items():
        if section not in ("backend", "task", "sampling"):
            example[section] = {**example.get(section, {}), **values}
    example["sampling"] = {**debug["sampling"], "visual_thoughts": example["sampling"]["visual_thoughts"]}
    example["task"] = {**example["task"], **{key: debug["task"][key] for key in ("eval_fraction", "num_used")}}
    backend = example["backend"]
    backend.update({key: debug["backend"][key] for key in SIZES}, checkpoint=str(answering), drawing_checkpoint=str(drawing))
    return example


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from opsd_emu3.backend import Emu3Backend
    from opsd_emu3.config import Emu3Params

    root = tmp_path_factory.mktemp("emu3-draw")
    for name, seed in (("chat", 0), ("gen", 1)):
        backend = Emu3Backend(Emu3Params(flavour="debug", seed=seed, image_min_pixels=256, image_max_pixels=1024, vt_grid=(4, 4)))
        backend.save_pretrained(backend.build_model(), root / name)
    config = debug_sized_example(root / "chat", root / "gen")
    assert config["backend"]["checkpoint_kind"] == "chat" and config["sampling"]["visual_thoughts"] == "generate"
    (root / "emu3-draw.toml").write_text(tomli_w.dumps(config))
    data = write_demo_dataset(root / "data", rows_per_dataset=4, side=56)
    return run_config_file(root / "emu3-draw.toml", root, [f"task.root='{data}'", *FAST])


def test_training_steps_drew_visual_thoughts_with_the_drawing_checkpoint(finished_run):
    assert finished_run.missing_files() == []
    opsd = finished_run.step_metrics("opsd")
    assert [line["step"] for line in opsd] == [1, 2]
    assert all(line["visual_thought_s"] > 0 for line in opsd), "no visual thought was drawn"
    assert all(line["loss"] >= 0 and line["grad_norm"] > 0 for line in opsd)
