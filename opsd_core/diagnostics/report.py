"""The run report: a results table (markdown and terminal) and PNG plots.

Owns: turning ``results.json`` and ``metrics.jsonl`` into ``report.md`` (with the answer lengths
and the batch-1 text-vs-VT latency, and the before/after gallery of the media problems),
``accuracy.png``, ``loss.png`` and ``kl.png``; the number and table formatting the other
diagnostic pages share.
Does not know: how the figures were produced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opsd_core.rundir import RunDirectory, visual_thought_file, write_atomic

PHASE_TITLES = {
    "opsd": "Visual-OPSD",
    "noise": "Noise-VT control",
    "shuffled": "Shuffled-VT control",
    "sft": "SFT control",
}


PHASE_COLOURS = ["#c63", "#39c", "#a5c", "#6a4"]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _with_error(record: dict[str, Any], name: str, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """``record[name]`` with ``± record[name + "_se"]`` where a standard error was recorded."""
    value = f"{scale * record[name]:.{digits}f}{unit}"
    error = record.get(f"{name}_se")
    if error is None or error != error:  # absent, or NaN (one sample)
        return value
    return f"{value} ± {scale * error:.{digits}f}{unit}"


def results_table(results: dict[str, Any]) -> list[list[str]]:
    """Rows of the results table: header first."""
    start = results["start"]
    before = start["eval"]["student"]["accuracy"]
    rows = [["phase", "student acc before", "student acc after", "gain (points)", "teacher-ctx acc", "EMA-teacher acc",
             "KL(T||S) before", "KL to start teacher after", "gap closure", "train s", "eval s"]]
    rows.append([
        "start checkpoint", _percent(before), "-", "-", _percent(start["eval"]["teacher"]["accuracy"]), "-",
        _with_error(start, "kl"), "-", "-", "-", f"{start['wall_s']:.0f}",
    ])
    for phase, title in PHASE_TITLES.items():
        record = results.get(phase)
        if record is None:
            continue
        after = record["eval"]["student"]["accuracy"]
        rows.append([
            title,
            _percent(before),
            _percent(after),
            f"{100 * (after - before):+.1f}",
            _percent(record["eval"]["teacher"]["accuracy"]),
            _percent(record["teacher_eval"]["teacher"]["accuracy"]),
            _with_error(start, "kl"),
            _with_error(record, "kl_t0"),
            _with_error(record, "gap_closure", 100, 1, "%") if "gap_closure" in record else "-",
            f"{record['train_s']:.0f}",
            f"{record['eval_s']:.0f}",
        ])
    return rows


def format_markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def format_terminal(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def write_plots(directory: Path, results: dict[str, Any]) -> list[str]:
    """Accuracy bars, loss curves and KL bars as PNG files; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    start = results["start"]
    phases = [phase for phase in PHASE_TITLES if phase in results]

    figure, axis = plt.subplots(figsize=(7, 4))
    labels = ["start (student ctx)", "start (teacher ctx)"] + [f"{PHASE_TITLES[p]}\n(student ctx)" for p in phases]
    values = [start["eval"]["student"]["accuracy"], start["eval"]["teacher"]["accuracy"]]
    values += [results[p]["eval"]["student"]["accuracy"] for p in phases]
    bars = axis.bar(range(len(values)), [100 * v for v in values], color=["#888", "#446"] + PHASE_COLOURS[: len(phases)])
    axis.bar_label(bars, fmt="%.1f")
    axis.set_xticks(range(len(values)), labels, fontsize=8)
    axis.set_ylabel("greedy accuracy (%)")
    axis.set_ylim(0, 105)
    axis.set_title("Accuracy before and after training")
    figure.tight_layout()
    figure.savefig(directory / "accuracy.png", dpi=110)
    plt.close(figure)
    written.append("accuracy.png")

    metrics = RunDirectory(directory).metrics.read()
    if metrics:
        figure, axis = plt.subplots(figsize=(7, 4))
        for phase in phases:
            points = [(m["step"], m["loss"]) for m in metrics if m.get("phase") == phase and "loss" in m]
            if points:
                axis.plot(*zip(*points), label=PHASE_TITLES[phase])
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("training loss")
        axis.set_title("Training loss")
        axis.legend()
        figure.tight_layout()
        figure.savefig(directory / "loss.png", dpi=110)
        plt.close(figure)
        written.append("loss.png")

    figure, axis = plt.subplots(figsize=(7, 4))
    labels = ["start: KL(T||S)", "start: KL(noise-T||S)"] + [f"{PHASE_TITLES[p]}:\nKL(T0||S) after" for p in phases]
    values = [start["kl"], start["kl_noise"]] + [results[p]["kl_t0"] for p in phases]
    bars = axis.bar(range(len(values)), values, color=["#446", "#888"] + PHASE_COLOURS[: len(phases)])
    axis.bar_label(bars, fmt="%.3f")
    axis.set_xticks(range(len(values)), labels, fontsize=8)
    axis.set_ylabel("nats per completion token")
    axis.set_title("KL gap before and after")
    figure.tight_layout()
    figure.savefig(directory / "kl.png", dpi=110)
    plt.close(figure)
    written.append("kl.png")
    return written


VT_SOURCES = {
    "stored": "the task's stored visual thought (this backend cannot draw one, so the VT time is that of "
    "answering after an image, not of drawing it)",
    "drawn": "a visual thought the model draws first, drawing included in the time",
    "interleaved": "the model family's own interleaved inference, which draws visual thoughts mid-answer",
}


def format_number(value: float | None, pattern: str) -> str:
    """``value`` formatted with ``pattern``, or ``-`` when there is none."""
    return "-" if value is None else pattern.format(value)


def length_and_latency(results: dict[str, Any], task: str) -> list[str]:
    """The answer length per context (``eval.<context>.tokens_per_sample``: the paper's Table 4
    measure) and the batch-1 answer time in the text and the VT context (``latency``) of the
    start checkpoint and each trained student."""
    records = [("start checkpoint", results["start"])]
    records += [(title, results[phase]) for phase, title in PHASE_TITLES.items() if phase in results]
    rows = [["model", "text tokens/answer", "VT tokens/answer", "batch-1 text s", "batch-1 VT s", "VT / text time"]]
    for title, record in records:
        evaluation, latency = record["eval"], record.get("latency", {})
        text_s, vt_s = latency.get("text_s"), latency.get("vt_s")
        rows.append([
            title,
            format_number(evaluation["student"]["tokens_per_sample"], "{:.1f}"),
            format_number(evaluation.get("teacher", {}).get("tokens_per_sample"), "{:.1f}"),
            format_number(text_s, "{:.3f}"),
            format_number(vt_s, "{:.3f}"),
            format_number(vt_s / text_s if text_s and vt_s is not None else None, "{:.2f}x"),
        ])  # fmt: skip
    latency = results["start"].get("latency", {})
    lines = [
        f"## Answer length and latency (task `{task}`)",
        "",
        format_markdown(rows),
        "",
        "Tokens per answer are the greedy evaluation's means over all evaluation problems: text = the student "
        "context (no visual thought), VT = the teacher context.",
    ]
    if latency.get("problems"):
        lines.append(
            f"Batch-1 times are the mean seconds per answer over the first {latency['problems']} evaluation "
            f"problems answered one at a time after one warm-up answer; the VT context uses "
            f"{VT_SOURCES.get(latency['vt_source'], latency['vt_source'])}."
        )
    return lines + [""]


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'").replace("\n", " ") + "`" if text else "(empty)"


def gallery(results: dict[str, Any]) -> list[str]:
    """The before/after gallery: for each media problem, its visual thought, the start
    checkpoint's greedy completion and each trained student's, with their mean per-token
    KL(start teacher || student); empty when no media were recorded."""
    start = results.get("start", {}).get("media")
    if not start:
        return []
    phases = [phase for phase in PHASE_TITLES if results.get(phase, {}).get("media")]
    lines = [
        "## Before and after: the media problems",
        "",
        "Greedy completions of the start checkpoint and of each trained student on the same problems, with "
        "the mean per-token KL(start teacher with the VT || student) and whether the answer is right. The "
        "tokens coloured by KL are in `media/` (one HTML page per phase).",
        "",
        "| problem | visual thought | start checkpoint | " + " | ".join(PHASE_TITLES[p] for p in phases) + " |",
        "|---|---|---|" + "---|" * len(phases),
    ]
    by_phase = {phase: {item["problem_id"]: item for item in results[phase]["media"]} for phase in phases}
    for item in start:
        problem = item["problem_id"]
        cells = [problem, f"![VT]({visual_thought_file(problem)})"]
        for record in [item] + [by_phase[phase].get(problem) for phase in phases]:
            if record is None:
                cells.append("-")
                continue
            mark = "right" if record["correct"] else "wrong"
            cells.append(f"{_cell(record['completion'])} ({mark}, KL {record['mean_kl']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(directory: Path, results: dict[str, Any], config: Any) -> Path:
    """Write ``report.md`` and the plots; returns the report's path."""
    rows = results_table(results)
    plots = write_plots(directory, results)
    start = results["start"]["eval"]
    lines = [
        f"# Visual-OPSD run `{config.run.name}`",
        "",
        f"Backend `{config.backend.name}`, task `{config.task.name}`, divergence `{config.divergence.name}`, "
        f"teacher `{config.teacher.name}`; {config.schedule.total_steps} optimizer steps per phase; "
        f"{start['student']['count']} evaluation problems, greedy decoding.",
        "",
        format_markdown(rows),
        "",
        f"Start checkpoint, noise-VT context accuracy: {_percent(start['noise']['accuracy'])}%; "
        f"KL(noise-VT teacher || student): {_with_error(results['start'], 'kl_noise')} nats/token.",
        f"Total wall time: {results.get('total_wall_s', 0.0):.0f} s.",
        *[f"{PHASE_TITLES[p]}: on-policy sampler {results[p]['sampler_tokens_per_s']:.0f} completion tokens/s."
          for p in PHASE_TITLES if results.get(p, {}).get("sampler_tokens_per_s")],
        "",
        "KL values are nats per completion row, on position-aligned rows of on-policy student samples "
        "(paper Eq. 4); gap closure is 1 - KL(start teacher || trained student) / KL(start teacher || start "
        "student) (Eq. 9). Each ± is one standard error over the diagnostic's samples; before and after are "
        "estimated on the same problems with the same per-sample seeds, so the gap closure's error is paired.",
        "",
    ]
    lines += [f"![{name}]({name})" for name in plots]
    lines += ["", *length_and_latency(results, config.task.name), *gallery(results)]
    path = RunDirectory(directory).report_path
    write_atomic(path, "\n".join(lines) + "\n")
    return path
