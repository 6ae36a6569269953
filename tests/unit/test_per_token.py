"""The per-token KL analysis on the embedded default: its rows are the KL diagnostic's rows."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from opsd_core.cli import cli
from opsd_core.cli.shipped import default_config_path
from opsd_core.components import build_components
from opsd_core.config import load_config
from opsd_core.diagnostics.kl import kl_gap, on_policy_draws
from opsd_core.diagnostics.per_token import (
    END_CLASS,
    ENTROPY_BUCKETS,
    per_token_analysis,
    write_per_token,
)
from opsd_core.diagnostics.rows import row_entropy

SAMPLES = 12


@pytest.fixture(scope="module")
def setting():
    config = load_config(default_config_path(), ["diagnostics.kl_samples=12", "diagnostics.batch_size=5"])
    components = build_components(config, training=False)
    model = components.backend.build_model().eval()
    problems = list(components.task.eval_problems(SAMPLES))
    common = dict(batch_size=config.diagnostics.batch_size, seed=3, sampler=components.sampler_with())
    return components, model, problems, common


@pytest.fixture(scope="module")
def analysis(setting):
    components, model, problems, common = setting
    draws = on_policy_draws(components.backend, model, model, model, problems, entropy=True, **common)
    return per_token_analysis(draws, components.backend, components.task)


def test_the_rows_sum_to_the_kl_the_diagnostic_reports_on_the_same_draws(setting, analysis):
    components, model, problems, common = setting
    estimate = kl_gap(components.backend, model, model, model, problems, **common)
    assert analysis["rows"] == sum(rows for _, rows in estimate.per_sample)
    assert analysis["kl_sum"] == pytest.approx(sum(total for total, _ in estimate.per_sample), rel=1e-9)
    assert analysis["mean_kl"] == pytest.approx(estimate.mean, rel=1e-9)
    assert analysis["mean_kl"] > 0


@pytest.mark.parametrize("table", ["by_token", "by_position", "by_class", "by_entropy"])
def test_every_table_partitions_the_rows_and_its_shares_sum_to_one(analysis, table):
    groups = analysis[table]
    assert groups
    assert sum(group["rows"] for group in groups) == analysis["rows"]
    assert sum(group["kl_sum"] for group in groups) == pytest.approx(analysis["kl_sum"], rel=1e-9)
    assert sum(group["share"] for group in groups) == pytest.approx(1.0, rel=1e-9)
    for group in groups:
        if group["rows"]:
            assert group["mean_kl"] == pytest.approx(group["kl_sum"] / group["rows"])


def test_entropy_quantiles_are_equal_count_ordered_and_the_top_one_is_the_forking_share(analysis):
    buckets = analysis["by_entropy"]
    assert len(buckets) == ENTROPY_BUCKETS
    assert max(b["rows"] for b in buckets) - min(b["rows"] for b in buckets) <= 1
    for lower, upper in zip(buckets, buckets[1:]):
        assert lower["entropy_max"] <= upper["entropy_min"]
    assert analysis["forking_share"] == buckets[-1]["share"]


def test_the_tiny_task_classes_moves_cells_and_the_end_row(setting, analysis):
    components, _, problems, _ = setting
    task = components.task
    assert [task.token_class(word) for word in ("R", "U", "c0", "c24", "lake", "<eos>", "xyz")] == [
        "move", "move", "cell", "cell", "prompt word", "special", None
    ]  # fmt: skip
    classes = {group["name"]: group for group in analysis["by_class"]}
    assert {"move", "cell", END_CLASS} <= set(classes)
    assert classes[END_CLASS]["rows"] == SAMPLES  # one end row per completion
    tokens = {group["name"]: group for group in analysis["by_token"]}
    assert tokens["⏎"]["token_class"] == END_CLASS and tokens["R"]["token_class"] == "move"
    shares = [group["kl_sum"] for group in analysis["by_token"]]
    assert shares == sorted(shares, reverse=True)


def test_positions_are_buckets_of_equal_width_from_the_first_row(analysis):
    buckets = analysis["by_position"]
    assert buckets[0]["first"] == 0
    widths = {b["last"] - b["first"] for b in buckets}
    assert len(widths) == 1
    for earlier, later in zip(buckets, buckets[1:]):
        assert later["first"] == earlier["last"] + 1


def test_row_entropy_is_that_of_the_softmax_and_zero_off_the_mask():
    logits = torch.tensor([[[0.0, 0.0], [5.0, -5.0]], [[0.0, 0.0], [1.0, 1.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    entropy = row_entropy(logits, mask)
    assert entropy[0, 0] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert 0 < entropy[0, 1] < 1e-3
    assert entropy[1, 1] == 0


def test_the_files_are_written(analysis, tmp_path):
    paths = write_per_token(tmp_path, analysis, "start checkpoint")
    assert [path.name for path in paths] == ["per_token.json", "per_token.md", "per_token.png"]
    assert json.loads(paths[0].read_text())["rows"] == analysis["rows"]
    markdown = paths[1].read_text()
    for heading in ("By the student's entropy", "By position", "By token class", "By token ("):
        assert heading in markdown
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_opsd_diagnose_per_token_writes_the_analysis_of_its_own_kl(tmp_path):
    out = tmp_path / "analysis"
    arguments = ["diagnose", "--set", "diagnostics.kl_samples=6", "--per-token", "--out", str(out)]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    saved = json.loads((out / "per_token.json").read_text())
    assert saved["mean_kl"] == pytest.approx(figures["kl"], rel=1e-9)
    assert figures["forking_share"] == saved["forking_share"] and figures["per_token"] == str(out)
    refused = CliRunner().invoke(cli, ["diagnose", "--out", str(out)])
    assert refused.exit_code == 2 and "--per-token" in refused.output
