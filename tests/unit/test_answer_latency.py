"""The batch-1 text-vs-VT latency and the answer lengths in results.json and report.md."""

from __future__ import annotations

import pytest

from opsd_core.cli.shipped import default_config_path
from opsd_core.components import build_components
from opsd_core.config import load_config
from opsd_core.diagnostics.report import length_and_latency
from opsd_core.evaluation import evaluate
from opsd_core.evaluation.evaluate import answer_latency


@pytest.fixture(scope="module")
def setting():
    components = build_components(load_config(default_config_path()), training=False)
    model = components.backend.build_model().eval()
    return components, model, list(components.task.eval_problems(3))


def test_the_tiny_backend_answers_one_at_a_time_with_the_stored_visual_thought(setting):
    components, model, problems = setting
    model.train()
    figures = answer_latency(components.backend, model, problems, components.evaluation_sampler(), 64)
    assert model.training  # its mode is given back
    assert figures["problems"] == 3 and figures["vt_source"] == "stored"
    assert figures["text_s"] > 0 and figures["vt_s"] > 0 and figures["vt_images"] == 0
    batched = evaluate(components.backend, model, components.task, problems, contexts=("student", "teacher"),
                       sampler=components.evaluation_sampler())  # fmt: skip
    assert figures["text_tokens"] == pytest.approx(batched["student"].tokens_per_sample)
    assert figures["vt_tokens"] == pytest.approx(batched["teacher"].tokens_per_sample)


def test_no_problems_or_no_visual_thought_leave_the_figures_empty(setting):
    components, model, problems = setting
    sampler = components.evaluation_sampler()
    none = answer_latency(components.backend, model, [], sampler, 64)
    assert none["problems"] == 0 and none["text_s"] is None and none["vt_s"] is None
    bare = [type(problem)(problem.id, problem.image, problem.question) for problem in problems[:1]]
    without_vt = answer_latency(components.backend, model, bare, sampler, 64)
    assert without_vt["text_s"] > 0 and without_vt["vt_s"] is None and without_vt["vt_tokens"] is None


def _record(tokens, latency=None):
    record = {"eval": {"student": {"tokens_per_sample": tokens}, "teacher": {"tokens_per_sample": tokens + 2}}}
    return record | ({"latency": latency} if latency else {})


def test_the_report_shows_lengths_and_latency_per_model():
    latency = {"problems": 4, "vt_source": "stored", "text_s": 0.010, "vt_s": 0.015}
    results = {"start": _record(9.0, latency), "opsd": _record(7.5, latency | {"vt_s": 0.02}), "noise": _record(8.0)}
    lines = length_and_latency(results, "frozen-lake")
    table = [line for line in "\n".join(lines).splitlines() if line.startswith("| ")]
    assert table[1] == "| start checkpoint | 9.0 | 11.0 | 0.010 | 0.015 | 1.50x |"
    assert table[2] == "| Visual-OPSD | 7.5 | 9.5 | 0.010 | 0.020 | 2.00x |"
    assert table[3] == "| Noise-VT control | 8.0 | 10.0 | - | - | - |"  # a run from before latency was recorded
    assert any("stored visual thought" in line and "first 4 evaluation problems" in line for line in lines)
