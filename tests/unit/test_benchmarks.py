"""Benchmark files, prompts, scoring, aggregation and re-scoring, on generated miniature TSVs."""

from __future__ import annotations

import base64
import csv
import io
import json
import math

import pytest
from click.testing import CliRunner
from PIL import Image

from opsd_core.cli import cli
from opsd_core.evaluation import harness
from opsd_core.evaluation.benchmarks import (
    BENCHMARKS,
    BenchmarkItem,
    aggregate,
    benchmark_names,
    load_benchmark,
    prompt,
    read_tsv,
    score,
)
from opsd_core.evaluation.miniature import write_miniature_benchmarks


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_miniature_benchmarks(tmp_path_factory.mktemp("benchmarks"), per_benchmark=4)


def gold_response(item: BenchmarkItem) -> str:
    if item.benchmark == "vsp":
        return "I walk around the hole. \\boxed{R, R, D, D}"
    answer = item.answer[0] if isinstance(item.answer, list) else item.answer
    if item.options:  # circular questions are matched on the whole response only
        return f"<think>looking</think> The answer is {answer}."
    return f"<think>looking</think><answer>{answer}</answer>"


def test_every_benchmark_reads_from_its_release_file_names(root):
    for name, spec in BENCHMARKS.items():
        items = load_benchmark(name, root)
        assert items, name
        assert {item.source_file for item in items} == set(spec.files)
        assert all(item.images and all(image.mode == "RGB" for image in item.images) for item in items), name


def test_multi_image_cells_and_back_references(root):
    blink = load_benchmark("blink", root)
    assert all(len(item.images) == 2 for item in blink)
    sat = {item.index: item for item in load_benchmark("sat", root)}
    copy = sat[1_000_000]
    assert copy.images[0].tobytes() == sat[0].images[0].tobytes()
    assert copy.options["A"] == sat[0].options["B"]


def test_list_answers_and_extra_columns(root):
    chart = load_benchmark("chartqa", root)
    assert any(isinstance(item.answer, list) for item in chart) and any(isinstance(item.answer, str) for item in chart)
    vsp = load_benchmark("vsp", root)[0]
    assert "maze_map" in vsp.extra
    cv = load_benchmark("cv-bench", root)
    assert {item.extra["source"] for item in cv} == {"ADE20K", "COCO", "Omni3D"}


def test_multiple_choice_prompt_layout(root):
    item = load_benchmark("vispuzzle", root)[0]
    text = prompt(item)
    assert text.startswith("Hint: Compare the pieces.\nQuestion: ")
    assert "\nOptions:\nA. option a 0\nB. option b 0\n" in text
    assert not prompt(load_benchmark("blink", root)[0]).startswith("Hint:")  # an empty hint adds no line
    assert text.endswith("Please select the correct answer from the options above. \n")
    vsp = load_benchmark("vsp", root)[0]
    assert prompt(vsp) == vsp.question


def test_gold_answers_score_full_marks_and_wrong_ones_zero(root):
    for name, spec in BENCHMARKS.items():
        items = load_benchmark(name, root)
        hits = [score(item, gold_response(item)).hit for item in items]
        assert aggregate(spec, items, hits)["accuracy"] == 100.0, name
        misses = [score(item, "<answer>no idea</answer>").hit for item in items]
        assert aggregate(spec, items, misses)["accuracy"] == 0.0, name


def test_circular_questions_need_every_rotation(root):
    items = load_benchmark("sat", root)
    hits = [item.index != 1_000_000 for item in items]  # question 0 fails in its rotated copy only
    figures = aggregate(BENCHMARKS["sat"], items, hits)
    assert figures["questions"] == 4
    assert figures["accuracy"] == 75.0


def test_cv_bench_averages_2d_sources_then_the_two_halves(root):
    items = load_benchmark("cv-bench", root)
    # 2D: COCO rows (even positions) right, ADE20K wrong -> 2D 50; 3D all right -> 100.
    hits = [(item.extra["source"] != "ADE20K") for item in items]
    figures = aggregate(BENCHMARKS["cv-bench"], items, hits)
    assert figures["2d"] == 50.0 and figures["3d"] == 100.0 and figures["accuracy"] == 75.0


def test_mmvp_reports_pair_accuracy_too(root):
    items = load_benchmark("mmvp", root)
    hits = [item.index != 1 for item in items]
    figures = aggregate(BENCHMARKS["mmvp"], items, hits)
    assert figures["accuracy"] == 75.0 and figures["pair_accuracy"] == 50.0


def test_vsp_simulates_the_moves(root):
    item = load_benchmark("vsp", root)[0]
    assert score(item, "\\boxed{D, D, R, R}").hit  # another route that avoids the hole
    assert not score(item, "\\boxed{R, D, D, R}").hit  # through the hole
    assert score(item, "\\boxed{R,R,D,D}").extracted == "R,R,D,D"


def test_unknown_names_and_missing_files_are_explained(tmp_path):
    with pytest.raises(ValueError, match="known: vsp"):
        benchmark_names("vsp,chartqqa")
    assert benchmark_names("all") == list(BENCHMARKS)
    with pytest.raises(FileNotFoundError, match="ChartQA_h_bar.tsv"):
        load_benchmark("chartqa", tmp_path)


def test_a_dangling_back_reference_is_an_error(tmp_path):
    path = tmp_path / "VisPuzzle.tsv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "image", "question", "A", "B", "answer"])
        writer.writerow([0, "7", "q", "x", "y", "A"])
    with pytest.raises(ValueError, match="neither base64 nor the index"):
        read_tsv(path, "vispuzzle")


def test_base64_jpeg_images_decode(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buffer, format="JPEG")
    path = tmp_path / "VStarBench.tsv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "image", "question", "A", "B", "answer", "category"])
        writer.writerow([5, base64.b64encode(buffer.getvalue()).decode(), "q", "x", "y", "B", "relative_position"])
    (item,) = read_tsv(path, "vstar")
    assert item.images[0].size == (8, 6) and item.category == "relative_position" and item.options == {"A": "x", "B": "y"}


def _predictions(root, path, modes=("text",), skip=()):
    with open(path, "w") as handle:
        for mode in modes:
            for name in BENCHMARKS:
                for item in load_benchmark(name, root):
                    if (name, item.index) in skip:
                        continue
                    record = {"benchmark": name, "index": item.index, "response": gold_response(item), "mode": mode}
                    handle.write(json.dumps(record | {"tokens": 10, "seconds": 0.5}) + "\n")


def test_rescoring_recorded_answers(root, tmp_path):
    path = tmp_path / "predictions.jsonl"
    _predictions(root, path, modes=("text", "vt"), skip={("vispuzzle", 0)})
    with open(path, "a") as handle:
        handle.write('{"benchmark": "vsp", "ind')  # a line cut by a crash
    results = harness.score_predictions(harness.read_predictions(path), list(BENCHMARKS), root)[0]
    assert set(results) == {"text", "vt"}
    assert results["text"]["vispuzzle"]["accuracy"] == 75.0  # the unanswered item counts as wrong
    assert results["text"]["vispuzzle"]["categories"] == {"demo": 75.0}
    assert results["text"]["vstar"]["categories"] == {"direct_attributes": 100.0}
    assert results["text"]["vsp"]["accuracy"] == 100.0 and results["text"]["vsp"]["tokens"] == 10
    assert math.isclose(results["text"]["average"]["accuracy"], (8 * 100 + 75) / 9)


def test_a_malformed_record_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"benchmark": "vsp", "response": "x"}\n{"benchmark": "vsp", "index": 0, "response": "x"}\n')
    with pytest.raises(ValueError, match="lacks \\['index'\\]"):
        harness.read_predictions(path)


def test_opsd_eval_rescores_predictions_without_a_model(root, tmp_path):
    path = tmp_path / "predictions.jsonl"
    _predictions(root, path)
    result = CliRunner().invoke(
        cli, ["eval", "--benchmarks", "sat,chartqa,vstar", "--data-root", str(root), "--predictions", str(path),
              "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "| sat | 100.0 |" in result.output and "| chartqa | 100.0 |" in result.output
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["text"]["sat"]["questions"] == 4
    assert "categories" not in saved["text"]["sat"]  # the SAT copy has no category column
    assert saved["text"]["vstar"]["categories"] == {"direct_attributes": 100.0}
    assert (tmp_path / "categories.csv").read_text().splitlines() == [
        "mode,benchmark,category,accuracy", 'text,vstar,"direct_attributes",100.00'
    ]


def test_opsd_eval_benchmark_arguments_are_checked(root):
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", "--benchmarks", "nope", "--data-root", str(root)])
    assert result.exit_code != 0 and "known: vsp" in result.output
    result = runner.invoke(cli, ["eval", "--benchmarks", "vsp"])
    assert result.exit_code != 0 and "--data-root" in result.output


def test_opsd_eval_answers_every_benchmark_with_the_tiny_backend(root, tmp_path):
    arguments = [
        "eval", "--benchmarks", "all", "--data-root", str(root), "--limit", "1", "--out", str(tmp_path),
        "--set", "backend.free_text=skip",
    ]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["benchmark"] for r in records) == sorted(BENCHMARKS)
    results = json.loads((tmp_path / "results.json").read_text())
    assert all(results["text"][name]["answered"] == 1 for name in BENCHMARKS)
