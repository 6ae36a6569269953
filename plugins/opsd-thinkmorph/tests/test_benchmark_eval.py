"""`opsd eval --benchmarks` with a model: the thinkmorph debug flavour answers miniature copies of
the benchmark files in text and visual-thought modes, a second call resumes from the records, and
--max-visual-thoughts caps the images drawn per answer."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from opsd_core.testing.cli import cli
from opsd_core.testing.miniature import write_miniature_benchmarks


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


def test_the_cli_caps_the_visual_thoughts_of_each_answer(tmp_path, monkeypatch):
    from opsd_core.api import CompletionBatch
    from opsd_core.api.backend import BatchedSampler

    def always_asks(self, model, contexts, generator=None):
        tokens = torch.tensor([[ord(c) % 50 + 10 for c in "ab"]] * len(contexts))
        width = tokens.shape[1]
        return CompletionBatch(tokens, torch.full((len(contexts),), width), torch.ones_like(tokens, dtype=torch.bool),
                               torch.ones(len(contexts), dtype=torch.bool))

    monkeypatch.setattr(BatchedSampler, "sample", always_asks)
    from opsd_thinkmorph import backend as backend_module

    monkeypatch.setattr(backend_module, "IMAGE_REQUEST", "")  # every round counts as asking for an image
    root = write_miniature_benchmarks(tmp_path / "data", per_benchmark=2)
    out = tmp_path / "eval"
    arguments = [
        "eval", "--backend", "thinkmorph-debug", "--benchmarks", "mmvp", "--data-root", str(root), "--limit", "1",
        "--mode", "vt", "--out", str(out), "--max-visual-thoughts", "2", "--set", "sampling.max_completion_tokens=40",
        "--set", "backend.vt_timesteps=2",
    ]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert record["images"] == 2 and record["tokens"] == 2 + 2 * (2 + 2)
