"""`opsd eval --benchmarks` with a model: the thinkmorph debug flavour answers miniature copies of
the benchmark files in text and visual-thought modes, and a second call resumes from the records."""

from __future__ import annotations

import json

from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_core.evaluation.miniature import write_miniature_benchmarks


def test_benchmarks_are_answered_in_both_modes_and_resumed(tmp_path):
    root = write_miniature_benchmarks(tmp_path / "data", per_benchmark=2)
    out = tmp_path / "eval"
    arguments = [
        "eval", "--backend", "thinkmorph-debug", "--benchmarks", "mmvp,blink", "--data-root", str(root),
        "--limit", "1", "--mode", "text,vt", "--out", str(out), "--set", "sampling.max_completion_tokens=4",
    ]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted((r["benchmark"], r["mode"]) for r in records) == [
        ("blink", "text"), ("blink", "vt"), ("mmvp", "text"), ("mmvp", "vt")
    ]
    assert all(r["tokens"] <= 4 and r["seconds"] > 0 for r in records)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"text", "vt"} and results["text"]["mmvp"]["answered"] == 1
    assert (out / "results.png").is_file()

    again = CliRunner().invoke(cli, arguments)
    assert again.exit_code == 0, again.output
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4, "answered items were answered again"
