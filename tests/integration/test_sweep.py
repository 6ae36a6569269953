"""`opsd sweep` end to end on a shortened quickstart: a sweep killed midway and run again
skips its finished runs and resumes the interrupted one; `opsd compare` of the finished runs
writes the sweep's report; the report's standard errors are those of the runs' results."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_core.rundir import MetricsLog, RunDirectory

# Each test runs several `opsd run` processes (about 30 s of CPU together): the slow tier.
pytestmark = pytest.mark.slow

QUICKSTART = str(Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml")
SHORT = [
    "schedule.total_steps=2",
    "schedule.warmup_steps=1",
    "train.samples_per_step=2",
    "train.checkpoint_every=1",
    "eval.limit=4",
    "diagnostics.kl_samples=4",
    "train.log_every=1",
    "logging.media_problems=0",
    "run.threads=1",  # a cap: on a busy machine, one thread per run is the fastest
]
RUNS = ["divergence.top_k=4_seed=0", "divergence.top_k=4_seed=1", "divergence.top_k=8_seed=0", "divergence.top_k=8_seed=1"]


def _sweep(out: Path, *arguments: str, short: list[str] = SHORT) -> list[str]:
    sets = [part for override in short for part in ("--set", override)]
    return [sys.executable, "-m", "opsd_core", "sweep", QUICKSTART, *sets, *arguments, "--out", str(out)]


def _finished(run: Path) -> bool:
    return (run / "report.md").is_file()


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory):
    """A 2-value grid x 2 seeds (no noise control), killed while its second run trains, then
    run again to the end; the first run's results as they were before the kill, and the second
    command's output."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    command = _sweep(out, "--grid", "divergence.top_k=4,8", "--seeds", "0,1", short=[*SHORT, "experiment.noise_control=false"])
    process = subprocess.Popen([*command, "--jobs", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while not (_finished(out / RUNS[0]) and (out / RUNS[1] / "opsd" / "checkpoints" / "step-0000001").is_dir()):
            assert process.poll() is None, "the sweep ended before it could be interrupted"
            assert time.monotonic() < deadline, "the sweep did not reach its second run's first checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the sweep and the run it started
        process.wait()
    assert not _finished(out / RUNS[1]) and not (out / RUNS[2]).exists()
    first_results = (out / RUNS[0] / "results.json").read_bytes()
    resumed = subprocess.run([*command, "--jobs", "2"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return out, first_results, resumed.stdout


def test_a_killed_sweep_skips_finished_runs_and_resumes_the_interrupted_one(resumed_sweep):
    out, first_results, output = resumed_sweep
    assert "1 of 4 runs already finished; skipping them." in output
    assert f"resuming {RUNS[1]}" in output and f"starting {RUNS[2]}" in output and f"starting {RUNS[3]}" in output
    assert (out / RUNS[0] / "results.json").read_bytes() == first_results
    steps = [line["step"] for line in MetricsLog(out / RUNS[1] / "metrics.jsonl").read("opsd") if "loss" in line]
    assert steps == [1, 2]  # the interrupted run continued: every step once
    assert (out / "logs" / f"{RUNS[1]}.log").read_text().count("Run directory:") == 2
    manifest = json.loads((out / "sweep.json").read_text())
    assert [run["name"] for run in manifest["runs"]] == RUNS
    assert all(run["status"] == "finished" for run in manifest["runs"])
    assert manifest["grid"] == {"divergence.top_k": [4, 8]} and manifest["seeds"] == [0, 1]
    assert "--grid divergence.top_k=4,8" in manifest["command"]
    assert manifest["wall_s"] > 0 and manifest["report"]["run_wall_s"] > 0
    threads = [tomllib.loads((out / run / "config.toml").read_text())["run"]["threads"] for run in RUNS]
    assert threads == [1, 1, 1, 1]  # --set run.threads=1 caps cores // jobs


def test_the_report_holds_the_mean_and_standard_error_over_seeds(resumed_sweep):
    out, _, _ = resumed_sweep
    report = json.loads((out / "sweep.json").read_text())["report"]
    assert report["keys"] == ["divergence.top_k"]
    for point, runs in zip(report["points"], (RUNS[:2], RUNS[2:])):
        closures = [json.loads((out / run / "results.json").read_text())["opsd"]["gap_closure"] for run in runs]
        summary = point["metrics"]["opsd"]["gap_closure"]
        # Two seeds: the sample standard deviation over sqrt(2) is half their distance.
        assert summary["mean"] == pytest.approx(sum(closures) / 2)
        assert summary["se"] == pytest.approx(abs(closures[0] - closures[1]) / 2)
        assert point["runs"] == runs and point["seeds"] == [0, 1]
    markdown = (out / "sweep.md").read_text()
    assert "## Visual-OPSD" in markdown and "| 4 | 2 |" in markdown and "| 8 | 2 |" in markdown
    assert not math.isnan(report["points"][0]["metrics"]["start"]["kl"]["mean"])
    for plot in ("sweep-accuracy.png", "sweep-gain.png", "sweep-gap-closure.png", "sweep-kl.png", "sweep-lengths.png",
                 "sweep-vs-divergence.top_k.png"):
        assert (out / plot).stat().st_size > 0


def test_compare_of_the_finished_runs_writes_the_sweeps_report(resumed_sweep, tmp_path):
    out, _, _ = resumed_sweep
    result = CliRunner().invoke(cli, ["compare", *(str(out / run) for run in reversed(RUNS)), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "grid keys: divergence.top_k" in result.output
    assert (tmp_path / "sweep.md").read_text() == (out / "sweep.md").read_text()
    ours = json.loads((tmp_path / "sweep.json").read_text())["report"]
    assert ours == json.loads((out / "sweep.json").read_text())["report"]


def test_a_two_by_two_grid_with_two_seeds_and_the_noise_control(tmp_path):
    command = _sweep(tmp_path, "--grid", "divergence.top_k=4,8", "--grid", "divergence.clip_mode=entry,token",
                     "--seeds", "0,1", "--jobs", "2")  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert len(manifest["runs"]) == 8 and all(run["status"] == "finished" for run in manifest["runs"])
    report = manifest["report"]
    assert report["keys"] == ["divergence.clip_mode", "divergence.top_k"] and len(report["points"]) == 4
    assert all(set(point["metrics"]) == {"start", "opsd", "noise"} for point in report["points"])
    markdown = (tmp_path / "sweep.md").read_text()
    assert "## Visual-OPSD" in markdown and "## Noise-VT control" in markdown
    for key in report["keys"]:
        assert (tmp_path / f"sweep-vs-{key}.png").is_file()


def test_sigterm_stops_the_sweep_and_its_running_run(tmp_path):
    out = tmp_path / "sweep"
    process = subprocess.Popen(_sweep(out, "--grid", "divergence.top_k=4"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = out / "divergence.top_k=4_seed=0"
    deadline = time.monotonic() + 120
    while not (run / "config.toml").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    (record,) = json.loads((out / "sweep.json").read_text())["runs"]
    assert record["status"] == "interrupted"
    with RunDirectory(run).lock():  # no process holds the run any more
        pass
