"""Benchmark evaluation: answer benchmark tasks with a model, or re-score recorded answers.

Owns: the contexts a benchmark item is asked in (``text``: system prompt, the item's images, its
prompt; ``vt``: the backend's interleaved visual-thought inference where it has one, else the
same context followed by a visual thought the model draws first), batched greedy
answering with per-item records appended to ``predictions.jsonl`` as they are produced (a
crashed run resumes from them), scoring every record, and the results: the table (JSON, Markdown,
a bar chart) and one scored record per item (``items.jsonl``).
Does not know: any model family (it drives a Backend), or any benchmark: each is a
:class:`~opsd_core.evaluation.benchmarks.BenchmarkTask` a plugin registers, which reads its
items, prompts them, scores a response and reports its figures.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from opsd_core.evaluation.benchmarks import (
    BenchmarkItem,
    BenchmarkTask,
    benchmark_tasks,
    circular_groups,
    multiple_choice_prompt,
)
from opsd_core.evaluation.items import BenchmarkDataError
from opsd_core.evaluation.judge import JudgeClient
from opsd_core.evaluation.judge_rules import judge_items
from opsd_core.evaluation.scorers import CIRCULAR_OFFSET

MODES = ("text", "vt")
PREDICTIONS = "predictions.jsonl"
ITEMS = "items.jsonl"
RESULTS = ("results.json", "results.md", "categories.csv", "results.png", ITEMS)


# ---------------------------------------------------------------------------------------------- answering
def item_context(backend, item: BenchmarkItem, visual_thought: Any | None = None, task: BenchmarkTask | None = None):
    """The context ``item`` is asked in: the backend's system prompt, the item's images, its prompt
    text (``task``'s prompt; without one, the harness's multiple-choice layout), and (VT mode)
    the visual thought after it."""
    from opsd_core.types import PROBLEM_IMAGE, QUESTION, SYSTEM, VISUAL_THOUGHT, Context, ImageSegment, TextSegment

    builder = backend.context_builder()
    system = getattr(builder, "system_prompt", None)
    segments: list = [TextSegment(SYSTEM, system)] if system else []
    segments += [
        ImageSegment(PROBLEM_IMAGE if i == 0 else f"{PROBLEM_IMAGE}_{i + 1}", image) for i, image in enumerate(item.images)
    ]
    segments.append(TextSegment(QUESTION, task.prompt(item) if task is not None else multiple_choice_prompt(item)))
    if visual_thought is not None:
        segments.append(ImageSegment(VISUAL_THOUGHT, visual_thought))
    return Context(tuple(segments))


def answer_benchmarks(
    backend,
    model,
    names: Sequence[str],
    data_root: Path,
    out_dir: Path,
    mode: str = "text",
    batch_size: int = 8,
    max_tokens: int = 1024,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
    max_visual_thoughts: int = 3,
) -> Path:
    """Answer every item of ``names`` greedily and append one record per item to ``out_dir/predictions.jsonl``.

    Records already in the file (same benchmark, index and mode) are kept and skipped, so a
    crashed run continues where it stopped. In ``vt`` mode a backend with interleaved inference
    draws up to ``max_visual_thoughts`` images per answer (the paper's harness: 3); one without
    draws one first. Returns the predictions file.
    """
    import torch
    from tqdm.auto import tqdm

    from opsd_core.evaluation.evaluate import greedy_decode, greedy_sampler
    from opsd_core.types import Problem

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PREDICTIONS
    done = {(r["benchmark"], r["index"], r.get("mode", "text")) for r in read_predictions(path)} if path.exists() else set()
    generator = torch.Generator().manual_seed(seed)
    sampler = greedy_sampler(backend, max_tokens)
    model.eval()
    from opsd_core.interfaces import Backend

    # The model family's own interleaved loop when it has one; else draw first, then answer.
    interleaved = type(backend).answer_with_visual_thoughts is not Backend.answer_with_visual_thoughts
    for name, task in benchmark_tasks(names).items():
        items = [i for i in task.items(data_root, limit) if (name, i.index, mode) not in done]
        bar = tqdm(total=len(items), desc=f"{name} ({mode})", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            started = time.perf_counter()
            problems = [Problem(item.id, item.images[0], task.prompt(item)) for item in batch]
            drawn = [0] * len(batch)
            if mode == "vt" and interleaved:
                answers = backend.answer_with_visual_thoughts(
                    model, [item_context(backend, item, task=task) for item in batch], problems, max_tokens, generator,
                    max_visual_thoughts=max_visual_thoughts,
                )
                completions, drawn = [tokens for tokens, _ in answers], [count for _, count in answers]
            else:
                thoughts: list[Any] = [None] * len(batch)
                if mode == "vt":
                    with torch.no_grad():
                        thoughts = backend.generate_visual_thought(model, problems, generator)
                    drawn = [1] * len(batch)
                contexts = [item_context(backend, item, thought, task) for item, thought in zip(batch, thoughts)]
                completions = greedy_decode(sampler, model, contexts, len(contexts))
            seconds = (time.perf_counter() - started) / len(batch)
            with open(path, "a", encoding="utf-8") as handle:
                for item, tokens, count in zip(batch, completions, drawn):
                    record = {
                        "benchmark": name,
                        "index": item.index,
                        "mode": mode,
                        "response": backend.decode(tokens),
                        "tokens": len(tokens),
                        "images": count,
                        "seconds": seconds,
                    }
                    handle.write(json.dumps(record) + "\n")
            bar.update(len(batch))
        bar.close()
    return path


# ---------------------------------------------------------------------------------------------- scoring
def read_predictions(path: Path) -> list[dict]:
    """Records of a predictions JSONL file; each needs ``benchmark`` (a string), ``index`` (an
    integer) and ``response`` (a string). A malformed line raises
    :class:`~opsd_core.evaluation.items.BenchmarkDataError` naming the file and the line; a cut
    last line (a crash while writing) is skipped, so its item is answered again."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise BenchmarkDataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                continue
            raise BenchmarkDataError(f"{path}, line {number}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict):
            raise BenchmarkDataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        missing = [key for key in ("benchmark", "index", "response") if key not in record]
        if missing:
            raise BenchmarkDataError(
                f"{path}, line {number}: record lacks {missing}; each line needs benchmark, index, response"
            )
        index = record["index"]
        if isinstance(index, bool) or not (isinstance(index, int) or (isinstance(index, str) and index.strip().isdigit())):
            raise BenchmarkDataError(f"{path}, line {number}: index {index!r} is not an integer")
        if not isinstance(record["response"], str) or not isinstance(record["benchmark"], str):
            raise BenchmarkDataError(f"{path}, line {number}: benchmark and response must be strings")
        if record.get("mode", "text") not in MODES:
            raise BenchmarkDataError(
                f"{path}, line {number}: mode {record['mode']!r} is not one of {', '.join(MODES)} (no mode means text)"
            )
        records.append(record | {"index": int(index)})
    return records


def _check_benchmarks_named(records: Sequence[dict], tasks: dict[str, BenchmarkTask]) -> None:
    """BenchmarkDataError for a record of a benchmark that no installed plugin provides (records
    of installed benchmarks left out of ``--benchmarks`` are skipped, as asked)."""
    known = set(benchmark_tasks("all")) | set(tasks)
    for record in records:
        if record["benchmark"] not in known:
            raise BenchmarkDataError(
                f"a prediction (index {record['index']}) names benchmark {record['benchmark']!r}, which is not "
                f"installed (known: {', '.join(sorted(known))})"
            )


def _check_indices_known(records: Sequence[dict], items_of: dict[str, list[BenchmarkItem]]) -> None:
    """BenchmarkDataError for a record whose index none of its benchmark's items has (answers of
    another version of the data set would otherwise be dropped without a word)."""
    indices = {name: {item.index for item in items} for name, items in items_of.items()}
    for record in records:
        known = indices.get(record["benchmark"])
        if known is not None and int(record["index"]) not in known:
            raise BenchmarkDataError(
                f"a prediction names {record['benchmark']} index {record['index']}, which its data has no item "
                "with; were the answers made on another version of its files?"
            )


def score_predictions(
    records: Iterable[dict],
    names: Sequence[str],
    data_root: Path,
    chartqa_gold_relative: bool = False,
    limit: int | None = None,
    judge: JudgeClient | None = None,
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[dict]]:
    """(results, item records) for the records of ``names``.

    ``results`` is ``{mode: {benchmark: figures}}``; figures hold ``accuracy`` (what the paper
    reports, 0-100), ``items``, ``answered``, the benchmark's breakdown (see
    :meth:`~opsd_core.evaluation.benchmarks.BenchmarkTask.figures`) and, when recorded, ``tokens`` and
    ``seconds`` per sample. Items without a record count as wrong; ``limit`` scores only each
    benchmark's first ``limit`` items (as answered with the same limit). Each mode also gets an
    ``average`` entry: the mean accuracy over the benchmarks.

    Each item record extends the prediction record (``response`` None when unanswered) with
    ``part``, ``category``, ``gold``, ``extracted``, ``rule`` (see
    :class:`~opsd_core.evaluation.rules.Verdict`), ``hit``, ``judge`` (None: exact matching
    decided) and, for circular benchmarks, ``question_hit`` (every rotated copy right).

    With a ``judge``, the items the harness would send to its LLM judge are decided by it
    (:func:`~opsd_core.evaluation.judge_rules.judge_items`): their ``judge`` is
    ``{"model", "replies"}``, and each benchmark's figures add ``judged`` (those items) and
    ``accuracy_exact`` (the accuracy exact matching alone gives).
    """
    records = list(records)
    by_mode: dict[str, dict[tuple[str, int], dict]] = {}
    for record in records:
        by_mode.setdefault(record.get("mode", "text"), {})[(record["benchmark"], int(record["index"]))] = record
    # Each benchmark is read (its images decoded) once, whatever the number of modes.
    tasks = benchmark_tasks(names)
    _check_benchmarks_named(records, tasks)
    items_of = {name: task.items(data_root, limit) for name, task in tasks.items()} if by_mode else {}
    if limit is None:  # every item is read: a record of none of them names another data set
        _check_indices_known(records, items_of)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    item_records: list[dict] = []
    for mode, answered in by_mode.items():
        table: dict[str, dict[str, Any]] = {}
        for name, task in tasks.items():
            items = items_of[name]
            verdicts, found = [], []
            for item in items:
                record = answered.get((name, item.index))
                found.append(record)
                verdicts.append(task.verdict(item, record["response"], chartqa_gold_relative) if record else None)
            judged: list[dict | None] = [None] * len(items)
            exact_hits = [verdict is not None and verdict.hit for verdict in verdicts]
            if judge is not None:
                responses = [record["response"] if record else None for record in found]
                verdicts, judged = judge_items(judge, task.judged_as, items, responses, verdicts, chartqa_gold_relative)
            hits = [verdict is not None and verdict.hit for verdict in verdicts]
            figures = task.figures(items, hits)
            if judge is not None:
                figures["judged"] = float(sum(record is not None for record in judged))
                figures["accuracy_exact"] = task.figures(items, exact_hits)["accuracy"]
            groups = circular_groups(items, hits) if task.circular else None
            for item, record, verdict, hit, judge_record in zip(items, found, verdicts, hits, judged):
                entry = dict(record) if record else {"benchmark": name, "index": item.index, "mode": mode, "response": None}
                entry |= {
                    "part": item.release_part,
                    "category": item.category,
                    "gold": item.answer,
                    "extracted": verdict.extracted if verdict else None,
                    "rule": verdict.rule if verdict else "unanswered",
                    "hit": hit,
                    "judge": judge_record,
                }
                if groups is not None:
                    entry["question_hit"] = groups.get(item.index % CIRCULAR_OFFSET, False)
                item_records.append(entry)
            present = [r for r in found if r is not None]
            figures["answered"] = float(len(present))
            for key in ("tokens", "seconds"):
                values = [r[key] for r in present if key in r]
                if values:
                    figures[key] = sum(values) / len(values)
            table[name] = figures
        accuracies = [figures["accuracy"] for figures in table.values() if not math.isnan(figures["accuracy"])]
        table["average"] = {"accuracy": sum(accuracies) / len(accuracies) if accuracies else math.nan}
        if judge is not None:
            exact = [figures.get("accuracy_exact", math.nan) for figures in table.values()]
            exact = [accuracy for accuracy in exact if not math.isnan(accuracy)]
            table["average"]["accuracy_exact"] = sum(exact) / len(exact) if exact else math.nan
            table["average"]["judged"] = sum(figures.get("judged", 0.0) for figures in table.values())
        results[mode] = table
    return results, item_records


# ---------------------------------------------------------------------------------------------- output
def results_markdown(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per benchmark, per mode: accuracy, tokens and seconds per sample; with a judge, also
    the items it decided and the accuracy of exact matching alone."""
    modes = [mode for mode in MODES if mode in results] + [m for m in results if m not in MODES]
    judged = any("judged" in figures for table in results.values() for figures in table.values())
    columns = ("acc", "tokens/sample", "s/sample") + (("judged", "acc exact") if judged else ())
    header = "| benchmark | " + " | ".join(f"{m} {column}" for m in modes for column in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns) * len(modes)]
    names = [n for n in next(iter(results.values())) if n != "average"] if results else []
    for name in [*names, "average"]:
        cells = []
        for mode in modes:
            figures = results[mode].get(name, {})
            cells.append(_cell(figures.get("accuracy"), "{:.1f}"))
            cells.append(_cell(figures.get("tokens"), "{:.0f}"))
            cells.append(_cell(figures.get("seconds"), "{:.2f}"))
            if judged:
                cells.append(_cell(figures.get("judged"), "{:.0f}"))
                cells.append(_cell(figures.get("accuracy_exact"), "{:.1f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float | None, pattern: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def write_results(results: dict[str, dict[str, dict[str, Any]]], items: Sequence[dict], out_dir: Path) -> list[Path]:
    """``results.json``, ``results.md``, ``categories.csv`` (mode, benchmark, category, accuracy),
    ``results.png`` (accuracy bars per benchmark and mode) and ``items.jsonl`` (one scored record
    per item, see :func:`score_predictions`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items_path = out_dir / ITEMS
    with open(items_path, "w", encoding="utf-8") as handle:
        for record in items:
            handle.write(json.dumps(record) + "\n")
    json_path, md_path, png_path = out_dir / "results.json", out_dir / "results.md", out_dir / "results.png"
    csv_path = out_dir / "categories.csv"
    json_path.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    md_path.write_text(results_markdown(results))
    lines = ["mode,benchmark,category,accuracy"]
    for mode, table in results.items():
        for name, figures in table.items():
            for category, accuracy in figures.get("categories", {}).items():
                lines.append(f'{mode},{name},"{category.replace(chr(34), chr(39))}",{accuracy:.2f}')
    csv_path.write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results)
    names = list(next(iter(results.values()))) if results else []
    figure, axes = plt.subplots(figsize=(max(6, 1.1 * len(names)), 3.5))
    width = 0.8 / max(len(modes), 1)
    for offset, mode in enumerate(modes):
        values = [results[mode].get(name, {}).get("accuracy", math.nan) for name in names]
        axes.bar([i + offset * width for i in range(len(names))], values, width, label=mode)
    axes.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return [json_path, md_path, csv_path, png_path, items_path]
