"""The run directory: its files, the metrics reader and the one-writer lock."""

from __future__ import annotations

import subprocess
import sys

import pytest

from opsd_core.errors import ConfigError
from opsd_core.rundir import MetricsLog, RunDirectory, RunDirectoryError


def test_a_new_run_writes_its_config_and_refuses_a_second_new_run(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.create("x = 1\n", resume=False)
    assert run.config_path.read_text() == "x = 1\n" and run.holds_run()
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        run.create("x = 2\n", resume=False)
    run.create("x = 2\n", resume=True)
    assert run.config_path.read_text() == "x = 1\n"  # a resume keeps the saved config


def test_results_round_trip_and_a_malformed_file_is_one_line(tmp_path):
    run = RunDirectory(tmp_path)
    assert run.read_results() == {}
    run.write_results({"start": {"kl": 0.25}})
    assert run.read_results() == {"start": {"kl": 0.25}}
    run.results_path.write_text('{"start": ')
    with pytest.raises(RunDirectoryError, match="results.json: not valid JSON"):
        run.read_results()


def test_metrics_by_phase_truncation_and_a_line_cut_by_a_crash(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert log.read() == []
    for phase in ("opsd", "noise"):
        for step in (1, 2, 3):
            log.append({"phase": phase, "step": step, "loss": step / 10})
    assert [r["step"] for r in log.read("noise")] == [1, 2, 3]
    log.truncate("opsd", 1)
    assert [(r["phase"], r["step"]) for r in log.read()] == [("opsd", 1), ("noise", 1), ("noise", 2), ("noise", 3)]
    with log.path.open("a") as handle:
        handle.write('{"phase": "noise", "st')  # killed mid-write
    assert len(log.read()) == 4
    log.truncate("noise", 2)
    assert log.path.read_text().endswith('"step": 2, "loss": 0.2}\n')


def test_a_malformed_line_before_the_last_is_an_error_naming_it(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path.write_text('{"phase": "opsd", "step": 1}\nnot json\n{"phase": "opsd", "step": 2}\n')
    with pytest.raises(RunDirectoryError, match="line 2 is not a JSON record"):
        log.read()


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    run = RunDirectory(tmp_path / "run")
    holder = (
        "import sys, time; from pathlib import Path; from opsd_core.rundir import RunDirectory\n"
        f"with RunDirectory(Path({str(run.path)!r})).lock():\n"
        "    print('locked', flush=True); sys.stdin.readline()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=f"in use by pid {process.pid} on "):
            with run.lock():
                pass
    finally:
        process.communicate("\n", timeout=30)
    with run.lock():  # released when the holder ended
        pass


def test_a_killed_holder_leaves_the_directory_free(tmp_path):
    run = RunDirectory(tmp_path / "run")
    holder = (
        "import os, signal; from pathlib import Path; from opsd_core.rundir import RunDirectory\n"
        f"with RunDirectory(Path({str(run.path)!r})).lock():\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", holder], check=False)
    with run.lock():  # the operating system released it with the process
        pass


def test_a_directory_with_files_but_no_config_is_not_adopted(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    (run.path / "results.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds files .*results.json.* but no config.toml"):
        run.create("x = 1\n", resume=False)
    assert not run.config_path.exists()


def test_an_unstarted_run_is_discarded_and_a_started_one_kept(tmp_path):
    run = RunDirectory(tmp_path / "run")
    with run.lock():
        run.create("x = 1\n", resume=False)
        assert run.discard_if_unstarted()
    assert not run.path.exists()
    run.create("x = 1\n", resume=False)
    run.metrics.append({"phase": "opsd", "step": 1})
    assert not run.discard_if_unstarted() and run.holds_run()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff{}", r"results.json: not UTF-8 text \(byte 0\)"),
        (b"[1, 2]", "results.json: expected an object of phase records, got an array"),
        (b'{"total_wall_s": 3, "opsd": "done"}', "results.json: 'opsd' is a string, not a phase record"),
        (b'{"start": 3}', "results.json: 'start' is a number, not a phase record"),
    ],
)
def test_damaged_results_are_one_line_naming_the_file(tmp_path, content, message):
    run = RunDirectory(tmp_path)
    run.results_path.write_bytes(content)
    with pytest.raises(RunDirectoryError, match=message):
        run.read_results()


def test_metrics_that_are_not_utf8_are_one_line(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.path.write_bytes(b'{"phase": "opsd", "step": 1}\n\xfe\n')
    with pytest.raises(RunDirectoryError, match=r"metrics.jsonl: not UTF-8 text \(byte 29\)"):
        log.read()


def test_a_lock_on_a_folder_where_no_run_came_to_be_leaves_nothing(tmp_path):
    run = RunDirectory(tmp_path / "out" / "run")
    with run.lock():
        pass
    assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with RunDirectory(tmp_path / "mine").lock():
        pass
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
