"""`opsd sweep` and `opsd compare` without training: bad input refused in one line before
anything is written, grid parsing and run names, and the comparison's means and standard
errors against a hand computation on run directories written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_core.config import load_config, to_toml
from opsd_core.diagnostics.comparison import read_runs, summarise
from opsd_core.errors import ConfigError
from opsd_core.sweep import parse_grid, run_names, split_values

QUICKSTART = str(Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml")


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--grid", "optim.lrr=1e-3,1e-4"], "--grid optim.lrr: not a field of the config"),
        (["--grid", "optim.lrr=1e-3,1e-4"], "(did you mean optim.lr?)"),
        (["--grid", "divergence.top_k=4,four"], "--grid point divergence.top_k=four: invalid"),
        (["--grid", "divergence.clip_mode=entry,tokn"], "Input should be 'entry' or 'token' (got 'tokn')"),
        (["--grid", "divergence.top_k=4", "--grid", "divergence.top_k=8"], "--grid divergence.top_k: the key is given twice"),
        (["--grid", "divergence.top_k=4,,8"], "empty value"),
        (["--grid", "divergence.top_k="], "empty value"),
        (["--grid", "divergence.top_k=4,4"], "the value 4 is given twice"),
        (["--grid", "divergence.top_k"], "write KEY=V1,V2,..."),
        (["--grid", "run.seed=0,1"], "--grid run.seed: not a grid key; use --seeds"),
        (["--grid", "run.name=a,b"], "--grid run.name: not a grid key"),
        (["--set", "run.seed=2"], "--set run.seed: the sweep sets it; use --seeds"),
        (["--grid", "run.threads=1,2"], "--grid run.threads: not a grid key"),
        (["--set", "optim.lr=1e-3", "--grid", "optim.lr=1e-3,1e-4"], "--grid optim.lr: also given with --set"),
        (["--seeds", "0,x"], "--seeds '0,x': write distinct non-negative integers"),
        (["--seeds", "-1"], "--seeds '-1': write distinct non-negative integers"),
        (["--seeds", "0,1,0"], "a seed is given twice"),
        (["--seeds", str(2**63)], "a seed must be below 2**63"),
        (["--jobs", "0"], "--jobs 0: run at least 1 job at a time"),
        (["--jobs", "100000"], "--jobs 100000: this machine gives the sweep"),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, arguments, expected):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(cli, ["sweep", QUICKSTART, "--out", str(out), *arguments])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.output
    assert not out.exists()


def test_every_grid_point_is_validated_before_any_run(tmp_path):
    # teacher.name=frozen has no decay: the quickstart's [teacher] decay makes that point invalid.
    result = CliRunner().invoke(
        cli, ["sweep", QUICKSTART, "--out", str(tmp_path / "s"), "--grid", "divergence.top_k=4,8", "--grid", "teacher.name=ema,frozen"]
    )
    assert result.exit_code != 0 and "--grid point divergence.top_k=4 teacher.name=frozen" in result.output
    assert "teacher.decay: unknown key 'decay'" in result.output and not (tmp_path / "s").exists()


def test_values_are_toml_literals_and_commas_inside_brackets_or_quotes_stay():
    assert split_values("1, [0.9,0.99] ,'a,b', {x = 1, y = 2}") == ["1", "[0.9,0.99]", "'a,b'", "{x = 1, y = 2}"]
    (axis,) = parse_grid(["optim.betas=[0.9,0.95],[0.9,0.999]"])
    assert axis.key == "optim.betas" and axis.values == ([0.9, 0.95], [0.9, 0.999])
    (axis,) = parse_grid(["divergence.clip_mode=entry,token"])
    assert axis.values == ("entry", "token") and axis.raw == ("entry", "token")
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["optim.lr=1e-3,0.001"])


def test_run_names_follow_the_grid_point_and_seed_and_stay_distinct():
    names = run_names([{"divergence.top_k": "4", "optim.lr": "1e-3"}], [0, 1])
    assert names == ["divergence.top_k=4_optim.lr=1e-3_seed=0", "divergence.top_k=4_optim.lr=1e-3_seed=1"]
    assert run_names([{}], [0, 1]) == ["seed=0", "seed=1"]  # no grid: the seeds alone
    alike = run_names([{"task.root": "'a/b'"}, {"task.root": "'a b'"}], [0])
    assert len(set(alike)) == 2 and all(name.startswith("task.root=-a-b-_seed=0-") for name in alike)
    assert all("/" not in name for name in alike)


def _write_run(directory: Path, overrides: list[str], student_after: float, kl_t0: float, tokens: float | None) -> None:
    """A finished run directory with a resolved config and a results.json of made-up figures."""
    config = load_config(QUICKSTART, [f"run.name='{directory.name}'", *overrides])
    directory.mkdir(parents=True)
    (directory / "config.toml").write_text(to_toml(config))
    evaluation = {"accuracy": 0.5, "count": 8}
    after = {"accuracy": student_after, "count": 8} | ({"tokens_per_sample": tokens} if tokens is not None else {})
    results = {
        "start": {"kl": 0.4, "kl_noise": 0.1, "eval": {"student": evaluation, "teacher": {"accuracy": 1.0}}},
        "opsd": {
            "eval": {"student": after, "teacher": {"accuracy": 0.75}},
            "teacher_eval": {"teacher": {"accuracy": 1.0}},
            "kl": 0.3, "kl_t0": kl_t0, "gap_closure": 1 - kl_t0 / 0.4,
        },
        "total_wall_s": 1.0,
    }  # fmt: skip
    (directory / "results.json").write_text(json.dumps(results))
    (directory / "report.md").write_text("# run\n")


def test_compare_groups_by_differing_fields_and_matches_a_hand_computed_standard_error(tmp_path):
    figures = {  # (top_k, seed) -> (student accuracy after, KL(T0||S) after, answer tokens)
        (4, 0): (0.25, 0.20, 10.0), (4, 1): (0.50, 0.30, 12.0), (4, 2): (0.75, 0.10, None),
        (8, 0): (0.60, 0.40, 9.0),
    }  # fmt: skip
    directories = []
    for (top_k, seed), (accuracy, kl_t0, tokens) in figures.items():
        directory = tmp_path / f"k{top_k}-s{seed}"
        _write_run(directory, [f"divergence.top_k={top_k}", f"run.seed={seed}", f"run.threads={seed + 1}"], accuracy, kl_t0, tokens)
        directories.append(directory)

    runs, keys = read_runs(directories)
    assert keys == ["divergence.top_k"]  # run.name, run.seed and run.threads are not grid keys
    report = summarise(runs, keys)
    four, eight = report["points"]
    assert four["point"] == {"divergence.top_k": 4} and four["seeds"] == [0, 1, 2]
    accuracy = four["metrics"]["opsd"]["student_accuracy"]
    # By hand: mean 0.5; deviations -0.25, 0, 0.25; sample variance 0.125 / 2; se = sqrt(0.0625 / 3).
    assert accuracy["mean"] == pytest.approx(0.5) and accuracy["se"] == pytest.approx(math.sqrt(0.0625 / 3))
    closure = four["metrics"]["opsd"]["gap_closure"]  # 0.5, 0.25, 0.75
    assert closure["mean"] == pytest.approx(0.5) and closure["se"] == pytest.approx(math.sqrt(0.0625 / 3))
    gain = four["metrics"]["opsd"]["gain"]
    assert gain["mean"] == pytest.approx(0.0) and gain["se"] == pytest.approx(accuracy["se"])
    tokens = four["metrics"]["opsd"]["student_tokens"]  # the run without answer lengths is left out
    assert tokens == {"mean": 11.0, "se": pytest.approx(1.0), "n": 2}
    assert eight["metrics"]["opsd"]["student_accuracy"] == {"mean": 0.6, "se": None, "n": 1}

    result = CliRunner().invoke(cli, ["compare", *map(str, directories), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "cmp" / "sweep.md").read_text()
    assert "| 4 | 3 | 50.0 ± 14.4 | 0.0 ± 14.4 | 50.0% ± 14.4% |" in markdown
    assert "| 8 | 1 | 60.0 | 10.0 | 0.0% |" in markdown  # one seed: no standard error
    assert "The runs' own wall times add up to 4 s" in markdown
    assert json.loads((tmp_path / "cmp" / "sweep.json").read_text())["report"] == json.loads(json.dumps(report))
    for plot in ("sweep-accuracy.png", "sweep-gap-closure.png", "sweep-vs-divergence.top_k.png"):
        assert (tmp_path / "cmp" / plot).is_file()


def test_compare_refuses_an_unfinished_run(tmp_path):
    _write_run(tmp_path / "run", [], 0.5, 0.2, None)
    (tmp_path / "run" / "report.md").unlink()
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "run"), "--out", str(tmp_path / "cmp")])
    assert result.exit_code != 0 and "the run has not finished; finish it with `opsd run --resume" in result.output


@pytest.mark.parametrize(("arguments", "threads"), [(["--jobs", "1"], 4), (["--jobs", "3"], 1), (["--jobs", "2", "--set", "run.threads=1"], 1)])
def test_jobs_times_threads_fit_the_cores(tmp_path, monkeypatch, arguments, threads):
    from opsd_core import sweep

    launched = []

    def execute(self, jobs, run_threads, echo):
        launched.append((jobs, run_threads, self.run_command(self.runs[0], run_threads)))
        return {}

    monkeypatch.setattr(sweep, "usable_cores", lambda: 4)
    monkeypatch.setattr(sweep.Sweep, "execute", execute)
    result = CliRunner().invoke(cli, ["sweep", QUICKSTART, "--out", str(tmp_path), "--grid", "divergence.top_k=4,8", *arguments])
    assert result.exit_code == 0, result.output
    ((jobs, run_threads, command),) = launched
    assert run_threads == threads and jobs * run_threads <= 4
    assert command[-2:] == ["--set", f"run.threads={threads}"]  # after the sweep's own --set
    assert "--set" in command and "run.name=\"divergence.top_k=4_seed=0\"" in command


def test_runs_that_differ_only_in_their_seed_make_one_point(tmp_path):
    for seed, accuracy in ((0, 0.25), (1, 0.75)):
        _write_run(tmp_path / f"s{seed}", [f"run.seed={seed}"], accuracy, 0.2, 10.0)
    runs, keys = read_runs([tmp_path / "s0", tmp_path / "s1"])
    assert keys == []
    (point,) = summarise(runs, keys)["points"]
    assert point["point"] == {} and point["metrics"]["opsd"]["student_accuracy"] == {"mean": 0.5, "se": 0.25, "n": 2}
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "grid keys: none (the runs differ only in their seed)" in (tmp_path / "c" / "sweep.md").read_text()


def test_a_second_sweep_in_the_same_directory_is_refused(tmp_path):
    from opsd_core.sweep import hold_sweep

    with hold_sweep(tmp_path):
        result = CliRunner().invoke(cli, ["sweep", QUICKSTART, "--out", str(tmp_path), "--grid", "divergence.top_k=4,8"])
    assert result.exit_code != 0 and "is in use by pid" in result.output
    assert "wait for that sweep to end or choose another --out" in result.output
    assert not list(tmp_path.glob("divergence*"))


def test_the_comparison_reads_batch_1_latency_where_recorded():
    from opsd_core.diagnostics.comparison import run_metrics

    evaluation = {"student": {"accuracy": 0.5, "tokens_per_sample": 9.0}, "teacher": {"accuracy": 0.9}}
    results = {
        "start": {"eval": evaluation, "kl": 0.3, "latency": {"text_s": 0.02, "vt_s": 0.05}},
        "opsd": {"eval": evaluation, "kl": 0.2, "kl_t0": 0.25, "teacher_eval": {"teacher": {"accuracy": 0.8}}},
    }
    metrics = run_metrics(results)
    assert metrics["start"]["text_latency"] == 0.02 and metrics["start"]["vt_latency"] == 0.05
    assert "text_latency" not in metrics["opsd"]  # not measured in that phase: left out, not zero
