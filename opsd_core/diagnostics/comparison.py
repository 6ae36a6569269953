"""The comparison report of several runs: ``sweep.md``, the ``report`` of ``sweep.json``, and plots.

Owns: reading finished run directories (``config.toml`` and ``results.json``), grouping runs
into grid points by the config fields that differ between them (the seed apart), each phase's
metrics per run (student accuracy, gain, gap closure, KL, answer lengths), their mean and
standard error over seeds per grid point, and writing the markdown tables and PNG plots.
Does not know: how the runs were launched (``opsd_core.sweep``), or how a run computes its
results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opsd_core.config import flat_fields, read_toml
from opsd_core.diagnostics.report import PHASE_COLOURS, PHASE_TITLES
from opsd_core.errors import ConfigError
from opsd_core.rundir import CONFIG, LAUNCH_FIELDS, RunDirectory, write_atomic

REPORT = "sweep.md"
MAIN_METRIC = "gap_closure"
# Fields that differ between runs without changing what they compute, or that name them.
_NOT_COMPARED = LAUNCH_FIELDS | {"run.name", "run.output_dir", "run.seed"}

# Metric -> (column title, scale for display, digits, unit). Accuracies and gap closure are
# fractions shown as percent.
METRICS: dict[str, tuple[str, float, int, str]] = {
    "student_accuracy": ("student acc", 100, 1, ""),
    "teacher_accuracy": ("teacher-ctx acc", 100, 1, ""),
    "noise_accuracy": ("noise-ctx acc", 100, 1, ""),
    "ema_teacher_accuracy": ("EMA-teacher acc", 100, 1, ""),
    "gain": ("gain (points)", 100, 1, ""),
    "gap_closure": ("gap closure", 100, 1, "%"),
    "kl": ("KL(T||S)", 1, 3, ""),
    "kl_noise": ("KL(noise-T||S)", 1, 3, ""),
    "kl_t0": ("KL(T0||S) after", 1, 3, ""),
    "student_tokens": ("student tokens", 1, 1, ""),
    "teacher_tokens": ("teacher-ctx tokens", 1, 1, ""),
    "noise_tokens": ("noise-ctx tokens", 1, 1, ""),
    "text_latency": ("text answer, batch 1", 1, 3, " s"),
    "vt_latency": ("VT answer, batch 1", 1, 3, " s"),
}
START_COLUMNS = (
    "student_accuracy", "teacher_accuracy", "noise_accuracy", "kl", "kl_noise", "student_tokens", "teacher_tokens",
    "text_latency", "vt_latency",
)  # fmt: skip
PHASE_COLUMNS = (
    "student_accuracy", "gain", "gap_closure", "kl_t0", "ema_teacher_accuracy", "student_tokens", "teacher_tokens",
    "text_latency", "vt_latency",
)  # fmt: skip
# Plots of every phase per grid point: file -> (metric, y label); "start" adds the start checkpoint.
_BAR_PLOTS = {
    "sweep-accuracy.png": ("student_accuracy", "student greedy accuracy (%)"),
    "sweep-gain.png": ("gain", "student accuracy gain (points)"),
    "sweep-gap-closure.png": ("gap_closure", "gap closure (%)"),
    "sweep-kl.png": ("kl_t0", "KL(start teacher || trained student), nats/token"),
    "sweep-lengths.png": ("student_tokens", "student answer length (tokens)"),
}


@dataclass(frozen=True)
class ComparedRun:
    """A finished run as the comparison sees it: its name, grid point, seed and results."""

    name: str
    point: dict[str, Any]
    seed: int
    results: dict[str, Any]


def _tokens(evaluation: dict[str, Any], context: str) -> float | None:
    return evaluation.get(context, {}).get("tokens_per_sample")


def _latency(record: dict[str, Any]) -> dict[str, float | None]:
    """Batch-1 seconds per answer in the text and the visual-thought context (``latency`` of
    a phase record; absent in runs recorded before it was measured)."""
    latency = record.get("latency") or {}
    return {"text_latency": latency.get("text_s"), "vt_latency": latency.get("vt_s")}


def run_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Phase ("start", "opsd", "noise", ...) -> metric -> value, of one run's ``results.json``;
    metrics a run did not record (answer lengths of older runs) are left out."""
    start = results["start"]
    before = start["eval"]["student"]["accuracy"]
    metrics = {
        "start": {
            "student_accuracy": before,
            "teacher_accuracy": start["eval"]["teacher"]["accuracy"],
            "noise_accuracy": start["eval"].get("noise", {}).get("accuracy"),
            "kl": start["kl"],
            "kl_noise": start.get("kl_noise"),
            **{f"{context}_tokens": _tokens(start["eval"], context) for context in ("student", "teacher", "noise")},
            **_latency(start),
        }
    }
    for phase in PHASE_TITLES:
        record = results.get(phase)
        if record is None:
            continue
        after = record["eval"]["student"]["accuracy"]
        metrics[phase] = {
            "student_accuracy": after,
            "gain": after - before,
            "gap_closure": record.get("gap_closure"),
            "kl_t0": record["kl_t0"],
            "kl": record["kl"],
            "teacher_accuracy": record["eval"]["teacher"]["accuracy"],
            "ema_teacher_accuracy": record["teacher_eval"]["teacher"]["accuracy"],
            **{f"{context}_tokens": _tokens(record["eval"], context) for context in ("student", "teacher")},
            **_latency(record),
        }
    return {phase: {k: v for k, v in values.items() if v is not None} for phase, values in metrics.items()}


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and its standard error, sample standard deviation / sqrt(n) (None for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _order(value: Any) -> tuple:
    """Sort key of a grid value: None, then booleans, numbers, strings, anything else."""
    if value is None:
        return (0,)
    if isinstance(value, bool):
        return (1, value)
    if isinstance(value, (int, float)):
        return (2, value)
    if isinstance(value, str):
        return (3, value)
    return (4, json.dumps(value, sort_keys=True))


def summarise(runs: Sequence[ComparedRun], keys: Sequence[str]) -> dict[str, Any]:
    """The comparison: grid keys (sorted) and, per grid point in order of its values, the
    runs, the seeds and each phase's metrics as {mean, se, n}."""
    keys = sorted(keys)
    groups: dict[str, list[ComparedRun]] = {}
    for run in runs:
        groups.setdefault(json.dumps([run.point.get(key) for key in keys]), []).append(run)
    points = []
    for members in sorted(groups.values(), key=lambda group: tuple(_order(group[0].point.get(k)) for k in keys)):
        members = sorted(members, key=lambda run: run.seed)
        per_run = [run_metrics(run.results) for run in members]
        phases = [phase for phase in ("start", *PHASE_TITLES) if any(phase in metrics for metrics in per_run)]
        summary: dict[str, dict[str, dict[str, float | None]]] = {}
        for phase in phases:
            names = [name for name in METRICS if any(name in metrics.get(phase, {}) for metrics in per_run)]
            summary[phase] = {}
            for name in names:
                values = [metrics[phase][name] for metrics in per_run if name in metrics.get(phase, {})]
                mean, error = mean_and_standard_error(values)
                summary[phase][name] = {"mean": mean, "se": error, "n": len(values)}
        points.append({
            "point": {key: members[0].point.get(key) for key in keys},
            "seeds": [run.seed for run in members],
            "runs": [run.name for run in members],
            "metrics": summary,
        })  # fmt: skip
    run_wall_s = sum(run.results.get("total_wall_s", 0.0) for run in runs)
    return {"keys": keys, "main_metric": MAIN_METRIC, "run_wall_s": run_wall_s, "points": points}


def _label(point: dict[str, Any]) -> str:
    return ", ".join(f"{key.rpartition('.')[2]}={json.dumps(value)}" for key, value in point.items()) or "(all runs)"


def _cell(summary: dict[str, Any] | None, name: str) -> str:
    if summary is None:
        return "-"
    _, scale, digits, unit = METRICS[name]
    text = f"{scale * summary['mean']:.{digits}f}{unit}"
    if summary["se"] is not None:
        text += f" ± {scale * summary['se']:.{digits}f}{unit}"
    return text


def _table(report: dict[str, Any], phase: str, columns: Sequence[str]) -> list[str]:
    keys = report["keys"]
    header = [*keys, "seeds", *(METRICS[name][0].replace("|", "\\|") for name in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point in report["points"]:
        metrics = point["metrics"].get(phase)
        if metrics is None:
            continue
        cells = [json.dumps(point["point"][key]) for key in keys] + [str(len(point["seeds"]))]
        cells += [_cell(metrics.get(name), name) for name in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison_markdown(report: dict[str, Any], plots: Sequence[str], notes: Sequence[str] = ()) -> str:
    """``sweep.md``: a table of the start checkpoint and one per phase, then the plots."""
    runs = sum(len(point["runs"]) for point in report["points"])
    keys = ", ".join(f"`{key}`" for key in report["keys"]) or "none (the runs differ only in their seed)"
    lines = [
        "# Sweep comparison",
        "",
        f"{runs} finished runs in {len(report['points'])} grid points; grid keys: {keys}. The runs' own wall "
        f"times add up to {report['run_wall_s']:.0f} s (runs in parallel overlap).",
        "Each cell is the mean ± one standard error over the seeds of its grid point (sample standard "
        "deviation / sqrt(n); no ± for a single seed). Accuracies and gains are in percent points of greedy "
        "accuracy; KL in nats per completion token; gap closure is 1 - KL(start teacher || trained student) "
        "/ KL(start teacher || start student); answer lengths are mean completion tokens per evaluation problem; "
        "batch-1 answer times are seconds per answer in the text and the visual-thought context (compare only "
        "runs made on equally loaded machines).",
        *notes,
        "",
        "## Start checkpoint",
        "",
        *_table(report, "start", START_COLUMNS),
    ]
    phases = [phase for phase in PHASE_TITLES if any(phase in point["metrics"] for point in report["points"])]
    for phase in phases:
        lines += ["", f"## {PHASE_TITLES[phase]}", "", *_table(report, phase, PHASE_COLUMNS)]
    lines += ["", "## Plots", "", *(f"![{name}]({name})" for name in plots), "", "## Runs", ""]
    lines += ["| grid point | seed | run |", "|---|---|---|"]
    for point in report["points"]:
        lines += [f"| {_label(point['point'])} | {seed} | `{name}` |" for seed, name in zip(point["seeds"], point["runs"])]
    return "\n".join(lines) + "\n"


def _errorbar_values(points: list[dict[str, Any]], phase: str, name: str, scale: float) -> tuple[list[float], list[float]]:
    means, errors = [], []
    for point in points:
        summary = point["metrics"].get(phase, {}).get(name)
        means.append(math.nan if summary is None else scale * summary["mean"])
        errors.append(0.0 if summary is None or summary["se"] is None else scale * summary["se"])
    return means, errors


def write_plots(directory: Path, report: dict[str, Any]) -> list[str]:
    """Per-metric bars over the grid points (every phase, ± standard error) and the main
    metric against each grid key (colour: the phase; line style: the other keys' setting);
    returns the files' names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    phases = [phase for phase in PHASE_TITLES if any(phase in point["metrics"] for point in points)]
    labels = [_label(point["point"]) for point in points]
    written = []
    for file, (name, ylabel) in _BAR_PLOTS.items():
        series = [("start", "start checkpoint", "#888")] if name in ("student_accuracy", "student_tokens") else []
        series += [(phase, PHASE_TITLES[phase], PHASE_COLOURS[i % len(PHASE_COLOURS)]) for i, phase in enumerate(phases)]
        width = 0.8 / max(1, len(series))
        figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(points) + 3), 4))
        for index, (phase, title, colour) in enumerate(series):
            means, errors = _errorbar_values(points, phase, name, METRICS[name][1])
            offsets = [position + (index - (len(series) - 1) / 2) * width for position in range(len(points))]
            axis.bar(offsets, means, width, yerr=errors, capsize=3, color=colour, label=title)
        axis.set_xticks(range(len(points)), labels, fontsize=7, rotation=20, ha="right")
        axis.set_ylabel(ylabel)
        axis.axhline(0, color="#444", linewidth=0.6)
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(directory / file, dpi=110)
        plt.close(figure)
        written.append(file)
    _, scale, _, _ = METRICS[MAIN_METRIC]
    for key in report["keys"]:
        values = sorted({json.dumps(point["point"][key]) for point in points}, key=lambda v: _order(json.loads(v)))
        others = [other for other in report["keys"] if other != key]
        figure, axis = plt.subplots(figsize=(7, 4))
        for index, phase in enumerate(phases):
            settings = sorted({json.dumps([p["point"][o] for o in others]) for p in points})
            for number, setting in enumerate(settings):
                line = [p for p in points if json.dumps([p["point"][o] for o in others]) == setting]
                line.sort(key=lambda p: values.index(json.dumps(p["point"][key])))
                means, errors = _errorbar_values(line, phase, MAIN_METRIC, scale)
                where = [values.index(json.dumps(p["point"][key])) for p in line]
                title = PHASE_TITLES[phase] + (f" ({_label(dict(zip(others, json.loads(setting))))})" if others else "")
                axis.errorbar(where, means, yerr=errors, marker="os^Dv"[number % 5], capsize=3, label=title,
                              linestyle=("-", "--", ":", "-.")[number % 4], color=PHASE_COLOURS[index % len(PHASE_COLOURS)])
        axis.set_xticks(range(len(values)), values)
        axis.set_xlabel(key)
        axis.set_ylabel("gap closure (%)")
        axis.axhline(0, color="#444", linewidth=0.6)
        axis.legend(fontsize=7)
        figure.tight_layout()
        file = f"sweep-vs-{key}.png"
        figure.savefig(directory / file, dpi=110)
        plt.close(figure)
        written.append(file)
    return written


def write_comparison(directory: Path, report: dict[str, Any], notes: Sequence[str] = ()) -> Path:
    """Write ``sweep.md`` and the plots into ``directory``; returns the markdown's path."""
    directory.mkdir(parents=True, exist_ok=True)
    plots = write_plots(directory, report) if report["points"] else []
    path = directory / REPORT
    write_atomic(path, comparison_markdown(report, plots, notes))
    return path


def read_runs(directories: Sequence[Path], keys: Sequence[str] | None = None) -> tuple[list[ComparedRun], list[str]]:
    """Finished runs and their grid keys: ``keys``, or else the config fields whose resolved
    values differ between the runs (launch settings, names and the seed apart); a ConfigError
    for a directory that holds no finished run."""
    configs, results = [], []
    for directory in directories:
        run_dir = RunDirectory(directory)
        if not run_dir.holds_run():
            raise ConfigError(f"{directory}: holds no {CONFIG}; it is not a run directory")
        found = run_dir.read_results()
        if "total_wall_s" not in found or not run_dir.report_path.is_file():
            raise ConfigError(f"{directory}: the run has not finished; finish it with `opsd run --resume {directory}`")
        configs.append(flat_fields(read_toml(run_dir.config_path)))
        results.append(found)
    if keys is None:
        fields = sorted(set().union(*configs) - _NOT_COMPARED) if configs else []
        keys = [field for field in fields if len({json.dumps(config.get(field)) for config in configs}) > 1]
    runs = [
        ComparedRun(Path(directory).name, {key: config.get(key) for key in keys}, int(config.get("run.seed", 0)), found)
        for directory, config, found in zip(directories, configs, results)
    ]
    return runs, list(keys)
