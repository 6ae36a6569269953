"""The paper's three effects on the shipped tiny UMM, with the full quickstart recipe
(``-m slow``; the default suite runs a shortened one, test_embedded_effects_short.py).

One experiment (KL diagnostic -> OPSD -> eval -> noise control -> eval) is run once for the
module; each test asserts one effect with wide margins, on the fixed 1000-problem eval set.
"""

from pathlib import Path

import pytest

from opsd_core.config import load_config, to_toml
from opsd_core.experiment import Experiment
from opsd_core.rundir import RunDirectory

pytestmark = pytest.mark.slow

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    config = load_config(QUICKSTART, [f"run.output_dir='{output}'"])
    run_dir = RunDirectory.of(config)
    run_dir.create(to_toml(config), resume=False)
    results = Experiment(config, run_dir, echo=lambda _: None, progress=False).run()
    results["directory"] = run_dir.path
    return results


def _accuracy(record, context="student"):
    return record["eval"][context]["accuracy"]


def test_teacher_context_is_accurate_and_student_lags(results):
    start = results["start"]
    assert _accuracy(start, "teacher") >= 0.95
    assert _accuracy(start, "student") <= _accuracy(start, "teacher") - 0.15


def test_kl_gap_is_clearly_positive(results):
    assert results["start"]["kl"] >= 0.1


def test_opsd_improves_the_student(results):
    gain = _accuracy(results["opsd"]) - _accuracy(results["start"])
    assert gain >= 0.05, gain


def test_noise_control_does_not_help(results):
    gain = _accuracy(results["noise"]) - _accuracy(results["start"])
    assert gain <= 0.02, gain
    assert _accuracy(results["opsd"]) - _accuracy(results["noise"]) >= 0.05


def test_run_directory_holds_the_report(results):
    directory = results["directory"]
    for name in ("config.toml", "metrics.jsonl", "results.json", "report.md", "accuracy.png", "loss.png", "kl.png"):
        assert (directory / name).is_file(), name
    report = (directory / "report.md").read_text()
    assert "Visual-OPSD" in report and "Noise-VT control" in report and "gap closure" in report
