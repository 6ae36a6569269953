"""The paper's effects on the shipped tiny UMM in a shortened quickstart, for the default suite.

The quickstart recipe with 100 of its 120 optimizer steps (64 problems each, 5 warm-up, lr
4.5e-4), 400 evaluation problems and 64 KL samples; the full-length run is
test_embedded_effects.py (``-m slow``). One experiment (KL diagnostic ->
OPSD -> eval -> noise control -> eval) runs once for the module. Measured with training seeds 0
and 1 (run.threads=1), from 66.8 %: Visual-OPSD gained 9.5 and 11.0 points, the noise control
lost 10.3 and 9.8. Other shortenings measured the same way: at the quickstart's 3e-4, 40 steps
of 64 lost 3 points and 300 steps of 16 gained 11 and 6 (three times the steps); 100 steps of
64 at 6e-4 gained 6 and 7; 200 steps of 16 at 6e-4 lost 14 and 6.
"""

from pathlib import Path

import pytest

from opsd_core.config import load_config, to_toml
from opsd_core.experiment import Experiment
from opsd_core.rundir import RunDirectory

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"
SHORTER = [
    "schedule.total_steps=100",
    "schedule.warmup_steps=5",
    "optim.lr=4.5e-4",
    "train.checkpoint_every=0",
    "eval.limit=400",
    "diagnostics.kl_samples=64",
    "logging.media_problems=0",  # neither changes what trains; both cost seconds
    "eval.latency_problems=0",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    config = load_config(QUICKSTART, [f"run.output_dir='{output}'", *SHORTER])
    run_dir = RunDirectory.of(config)
    run_dir.create(to_toml(config), resume=False)
    return Experiment(config, run_dir, echo=lambda _: None, progress=False).run()


def _accuracy(record, context="student"):
    return record["eval"][context]["accuracy"]


def test_the_teacher_context_helps_at_the_start(results):
    start = results["start"]
    assert _accuracy(start, "teacher") >= _accuracy(start, "student") + 0.15
    assert start["kl"] >= 0.1


def test_opsd_moves_the_student_up(results):
    gain = _accuracy(results["opsd"]) - _accuracy(results["start"])
    assert gain >= 0.03, gain


def test_the_noise_control_does_not(results):
    gain = _accuracy(results["noise"]) - _accuracy(results["start"])
    assert gain <= 0.02, gain
    assert _accuracy(results["opsd"]) - _accuracy(results["noise"]) >= 0.10, (results["opsd"], results["noise"])
