"""`opsd run`, `diagnose`, `eval` and `infer` end to end on a shortened quickstart."""

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core.cli import cli

QUICKSTART = str(Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml")


def _short(tmp_path):
    return [
        "--set", f"run.output_dir='{tmp_path}'",
        "--set", "schedule.total_steps=2",
        "--set", "schedule.warmup_steps=1",
        "--set", "train.samples_per_step=4",
        "--set", "train.checkpoint_every=1",
        "--set", "eval.limit=16",
        "--set", "diagnostics.kl_samples=8",
        "--set", "experiment.sft_control=true",
        "--set", "experiment.shuffled_vt_control=true",
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(cli, ["run", QUICKSTART, "--no-progress", *_short(tmp_path)])
    assert result.exit_code == 0, result.output
    return tmp_path / "quickstart", result.output


def test_run_writes_the_run_directory(finished_run):
    directory, output = finished_run
    for name in ("config.toml", "metrics.jsonl", "results.json", "report.md", "accuracy.png", "loss.png", "kl.png"):
        assert (directory / name).is_file(), name
    config = tomllib.loads((directory / "config.toml").read_text())
    assert config["schedule"]["total_steps"] == 2 and config["backend"]["name"] == "tiny-umm"
    phases = {json.loads(line)["phase"] for line in (directory / "metrics.jsonl").read_text().splitlines()}
    assert phases == {"opsd", "noise", "shuffled", "sft"}
    results = json.loads((directory / "results.json").read_text())
    assert {"start", "opsd", "noise", "shuffled", "sft"} <= set(results)
    assert "gap_closure" in results["shuffled"]
    for title in ("Visual-OPSD", "Noise-VT control", "Shuffled-VT control", "SFT control"):
        assert title in output and title in (directory / "report.md").read_text()
    assert (directory / "opsd" / "checkpoints" / "step-0000002" / "manifest.json").is_file()


def test_run_records_answer_lengths_and_batch_1_latency(finished_run):
    directory, _ = finished_run
    results = json.loads((directory / "results.json").read_text())
    for phase in ("start", "opsd", "noise", "shuffled", "sft"):
        latency = results[phase]["latency"]
        assert latency["vt_source"] == "stored" and latency["problems"] == 4
        assert latency["text_s"] > 0 and latency["vt_s"] > 0 and latency["text_tokens"] > 0
    report = (directory / "report.md").read_text()
    assert "## Answer length and latency (task `frozen-lake`)" in report
    assert "stored visual thought" in report


def test_run_writes_media_pages_and_the_report_gallery(finished_run):
    directory, _ = finished_run
    for phase, step in (("start", 0), ("opsd", 2), ("noise", 2), ("shuffled", 2), ("sft", 2)):
        page = (directory / "media" / f"{phase}-step-{step:07d}.html").read_text()
        assert page.count("<tr>") == 5 and 'title="KL ' in page and "data:image/png;base64," in page
    report = (directory / "report.md").read_text()
    assert "## Before and after" in report
    gallery = [line for line in report.splitlines() if line.startswith("| eval-")]
    assert len(gallery) == 4
    for line in gallery:
        image = line.split("](")[1].split(")")[0]
        assert (directory / image).is_file(), image
    results = json.loads((directory / "results.json").read_text())
    assert [item["problem_id"] for item in results["opsd"]["media"]] == [item["problem_id"] for item in results["start"]["media"]]


def test_a_second_run_into_the_same_directory_is_refused(finished_run, tmp_path):
    directory, _ = finished_run
    result = CliRunner().invoke(cli, ["run", QUICKSTART, *_short(directory.parent)])
    assert result.exit_code != 0 and "--resume" in result.output


def test_resume_of_a_finished_run_changes_nothing(finished_run):
    directory, _ = finished_run
    before = (directory / "results.json").read_text()
    metrics = (directory / "metrics.jsonl").read_text()
    result = CliRunner().invoke(cli, ["run", "--resume", str(directory), "--no-progress"])
    assert result.exit_code == 0, result.output
    after = json.loads((directory / "results.json").read_text())
    for phase in ("start", "opsd", "noise", "shuffled", "sft"):
        assert after[phase] == json.loads(before)[phase]
    assert (directory / "metrics.jsonl").read_text() == metrics


def test_resume_continues_in_a_copied_run_directory(finished_run, tmp_path):
    import shutil

    directory, _ = finished_run
    before = {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()}
    copy = tmp_path / "copied-run"
    shutil.copytree(directory, copy)
    results = json.loads((copy / "results.json").read_text())
    del results["sft"]
    (copy / "results.json").write_text(json.dumps(results))
    shutil.rmtree(copy / "sft" / "checkpoints" / "step-0000002")
    result = CliRunner().invoke(cli, ["run", "--resume", str(copy), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (copy / "sft" / "checkpoints" / "step-0000002" / "manifest.json").is_file()
    resumed = json.loads((copy / "results.json").read_text())["sft"]
    original = json.loads(before[directory / "results.json"])["sft"]
    assert resumed["eval"]["student"]["accuracy"] == original["eval"]["student"]["accuracy"]
    assert str(copy / "report.md") in result.output
    assert {path: path.read_bytes() for path in directory.rglob("*") if path.is_file()} == before  # untouched


def _copy(directory, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    return copy


def test_resume_refuses_changes_to_what_the_run_computes(finished_run, tmp_path):
    copy = _copy(finished_run[0], tmp_path)
    before = {path: path.read_bytes() for path in copy.rglob("*") if path.is_file()}
    result = CliRunner().invoke(cli, ["run", "--resume", str(copy), "--set", "optim.lr=0.01", "--no-progress"])
    assert result.exit_code != 0
    assert "optim.lr: 0.00045 -> 0.01" in result.output and "--allow-changes" in result.output
    assert {path: path.read_bytes() for path in copy.rglob("*") if path.is_file()} == before


def test_resume_records_launch_changes_and_allowed_changes(finished_run, tmp_path):
    copy = _copy(finished_run[0], tmp_path)
    config_before = (copy / "config.toml").read_text()
    result = CliRunner().invoke(cli, ["run", "--resume", str(copy), "--set", "run.threads=1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (copy / "config.toml").read_text() == config_before  # the launch layout is not the run's config
    (record,) = [json.loads(line) for line in (copy / "changes.jsonl").read_text().splitlines()]
    assert record["fields"] == {"run.threads": {"from": None, "to": 1}}

    args = ["run", "--resume", str(copy), "--set", "schedule.total_steps=3", "--allow-changes", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    config = tomllib.loads((copy / "config.toml").read_text())
    assert config["schedule"]["total_steps"] == 3
    assert "# changed on resume (changes.jsonl): schedule.total_steps = 2 -> 3" in (copy / "config.toml").read_text()
    record = json.loads((copy / "changes.jsonl").read_text().splitlines()[-1])
    assert record["fields"]["schedule.total_steps"] == {"from": 2, "to": 3}
    assert record["resumed_at"]["checkpoint_steps"] == {"noise": 2, "opsd": 2, "shuffled": 2, "sft": 2}


def test_a_second_writer_of_a_run_directory_is_refused(finished_run, tmp_path):
    from opsd_core.rundir import RunDirectory

    copy = _copy(finished_run[0], tmp_path)
    with RunDirectory(copy).lock():
        result = CliRunner().invoke(cli, ["run", "--resume", str(copy), "--no-progress"])
    assert result.exit_code != 0 and "is in use by pid" in result.output


def test_a_run_that_fails_at_start_up_leaves_no_directory(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    args = ["run", QUICKSTART, "--no-progress", *_short(tmp_path), "--set", f"backend.checkpoint='{missing}'"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert not (tmp_path / "quickstart").exists()


def test_resume_needs_a_run_directory(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--resume", str(tmp_path)])
    assert result.exit_code != 0 and "not a run directory" in result.output


def test_diagnose_eval_and_infer(finished_run, tmp_path):
    directory, _ = finished_run
    runner = CliRunner()
    checkpoint = str(directory / "opsd" / "checkpoints" / "step-0000002")
    common = [QUICKSTART, "--set", "eval.limit=8", "--set", "diagnostics.kl_samples=8"]
    diagnosed = runner.invoke(cli, ["diagnose", *common, "--checkpoint", checkpoint])
    assert diagnosed.exit_code == 0, diagnosed.output
    figures = json.loads(diagnosed.output)
    assert figures["kl"] > 0 and figures["samples"] == 8
    per_token = tmp_path / "per-token"
    analysed = runner.invoke(cli, ["diagnose", *common, "--checkpoint", checkpoint, "--per-token", "--out", str(per_token)])
    assert analysed.exit_code == 0, analysed.output
    assert json.loads(analysed.output)["kl"] == figures["kl"]  # the same draws, broken down
    assert json.loads((per_token / "per_token.json").read_text())["mean_kl"] == pytest.approx(figures["kl"])
    evaluated = runner.invoke(cli, ["eval", *common, "--contexts", "student,teacher"])
    rows = json.loads(evaluated.output)
    assert [row["context"] for row in rows] == ["student", "teacher"] and rows[0]["count"] == 8
    images = tmp_path / "images"
    answered = runner.invoke(cli, ["infer", *common, "--index", "2", "--context", "teacher", "--save-images", str(images)])
    assert answered.exit_code == 0, answered.output
    assert "response (teacher context)" in answered.output
    assert len(list(images.glob("*.png"))) == 2
    bad = runner.invoke(cli, ["eval", *common, "--contexts", "student,oracle"])
    assert bad.exit_code == 2 and "oracle" in bad.output


def test_a_backend_refusing_the_run_config_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    from opsd_core.errors import ConfigError
    from opsd_tiny.backend import TinyBackend

    def refuse(self, config):
        raise ConfigError(f"sampling.max_forward_tokens = {config.sampling.max_forward_tokens} is too many for me")

    monkeypatch.setattr(TinyBackend, "check_run", refuse)
    result = CliRunner().invoke(cli, ["run", QUICKSTART, "--no-progress", *_short(tmp_path)])
    assert result.exit_code != 0
    assert "is too many for me" in result.output
    assert not (tmp_path / "quickstart" / "metrics.jsonl").exists()
