"""The nine benchmark tasks: their files, prompts, scoring and figures, and `opsd eval` over
them, on generated miniature TSVs."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from opsd_benchmarks import tasks
from opsd_benchmarks.plugin import BENCHMARKS
from opsd_core.api.benchmarks import BenchmarkItem, BenchmarkTask
from opsd_core.testing.cli import build_plugin_manager, cli, fill_registries
from opsd_core.testing.miniature import write_miniature_benchmarks


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_miniature_benchmarks(tmp_path_factory.mktemp("benchmarks"), per_benchmark=4)


def task(name: str) -> BenchmarkTask:
    return getattr(tasks, BENCHMARKS[name][0])()


def load_benchmark(name: str, root) -> list[BenchmarkItem]:
    return task(name).items(root)


def test_the_registered_tasks_are_the_nine_benchmarks_and_only_evaluate():
    assert list(BENCHMARKS) == ["vsp", "vispuzzle", "blink-jigsaw", "sat", "blink", "chartqa", "vstar", "mmvp", "cv-bench"]
    registry = fill_registries(build_plugin_manager()).task
    for name in BENCHMARKS:
        entry = registry.get(name)
        assert entry.plugin == "benchmarks" and entry.resolve().name == name
        assert issubclass(entry.resolve(), BenchmarkTask) and not entry.resolve().trains


def gold_response(item: BenchmarkItem) -> str:
    if item.benchmark == "vsp":
        return "I walk around the hole. \\boxed{R, R, D, D}"
    answer = item.answer[0] if isinstance(item.answer, list) else item.answer
    if item.options:  # circular questions are matched on the whole response only
        return f"<think>looking</think> The answer is {answer}."
    return f"<think>looking</think><answer>{answer}</answer>"


def test_every_benchmark_reads_from_its_release_file_names(root):
    for name in BENCHMARKS:
        items = load_benchmark(name, root)
        assert items, name
        assert {item.source_file for item in items} == set(task(name).files)
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
    assert "maze_map" in vsp.extra and vsp.extra["maze_size"] == 3
    cv = load_benchmark("cv-bench", root)
    assert {item.extra["source"] for item in cv} == {"ADE20K", "COCO", "Omni3D"}


def test_multiple_choice_prompt_layout(root):
    item = load_benchmark("vispuzzle", root)[0]
    text = task("vispuzzle").prompt(item)
    assert text.startswith("Hint: Compare the pieces.\nQuestion: ")
    assert "\nOptions:\nA. option a 0\nB. option b 0\n" in text
    assert not task("blink").prompt(load_benchmark("blink", root)[0]).startswith("Hint:")  # an empty hint adds no line
    assert text.endswith("Please select the correct answer from the options above. \n")
    vsp = load_benchmark("vsp", root)[0]
    assert task("vsp").prompt(vsp) == vsp.question


def test_gold_answers_score_full_marks_and_wrong_ones_zero(root):
    for name in BENCHMARKS:
        benchmark = task(name)
        items = benchmark.items(root)
        hits = [benchmark.verdict(item, gold_response(item)).hit for item in items]
        assert benchmark.figures(items, hits)["accuracy"] == 100.0, name
        misses = [benchmark.verdict(item, "<answer>no idea</answer>").hit for item in items]
        assert benchmark.figures(items, misses)["accuracy"] == 0.0, name


def test_circular_questions_need_every_rotation(root):
    items = load_benchmark("sat", root)
    hits = [item.index != 1_000_000 for item in items]  # question 0 fails in its rotated copy only
    figures = task("sat").figures(items, hits)
    assert figures["questions"] == 4
    assert figures["accuracy"] == 75.0


def test_cv_bench_averages_2d_sources_then_the_two_halves(root):
    items = load_benchmark("cv-bench", root)
    # 2D: COCO rows (even positions) right, ADE20K wrong -> 2D 50; 3D all right -> 100.
    hits = [(item.extra["source"] != "ADE20K") for item in items]
    figures = task("cv-bench").figures(items, hits)
    assert figures["2d"] == 50.0 and figures["3d"] == 100.0 and figures["accuracy"] == 75.0


def test_mmvp_reports_pair_accuracy_too(root):
    items = load_benchmark("mmvp", root)
    hits = [item.index != 1 for item in items]
    figures = task("mmvp").figures(items, hits)
    assert figures["accuracy"] == 75.0 and figures["pair_accuracy"] == 50.0


def test_vsp_simulates_the_moves(root):
    vsp = task("vsp")
    item = vsp.items(root)[0]
    assert vsp.verdict(item, "\\boxed{D, D, R, R}").hit  # another route that avoids the hole
    assert not vsp.verdict(item, "\\boxed{R, D, D, R}").hit  # through the hole
    assert vsp.verdict(item, "\\boxed{R,R,D,D}").extracted == "R,R,D,D"


def test_chartqa_reports_each_file_and_the_named_gold_relative_option(root):
    chart = task("chartqa")
    items = chart.items(root)
    hits = [item.release_part == "ChartQA_h_bar" for item in items]
    figures = chart.figures(items, hits)
    assert figures["ChartQA_h_bar"] == 100.0 and figures["ChartQA_v_bar"] == 0.0 and figures["accuracy"] == 50.0
    item = next(item for item in items if item.answer == "10")
    assert chart.verdict(item, "<answer>10.5</answer>").hit  # 5 % of the prediction, as the harness measures
    assert not chart.verdict(item, "<answer>10.52</answer>", chartqa_gold_relative=True).hit


def test_a_benchmark_task_serves_the_task_role(root, tmp_path):
    from opsd_benchmarks.config import BenchmarkParams

    mmvp = tasks.MmvpTask(BenchmarkParams(data_root=str(root)))
    problems = mmvp.eval_problems(limit=2)
    assert [problem.id for problem in problems] == ["mmvp/1", "mmvp/2"]
    items = {item.id: item for item in mmvp.items(root, 2)}
    scores = [mmvp.score(problem, f"The answer is {items[problem.id].answer}.") for problem in problems]
    assert all(score.correct for score in scores)
    assert mmvp.aggregate(problems, scores) == {"items": 2.0, "accuracy": 1.0, "pair_accuracy": 1.0}
    with pytest.raises(ValueError, match="data_root"):
        tasks.MmvpTask().eval_problems()


def test_missing_files_and_a_bad_maze_size_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="ChartQA_h_bar.tsv"):
        load_benchmark("chartqa", tmp_path)
    vsp = write_miniature_benchmarks(tmp_path, per_benchmark=1) / "VSP_maze_task_main_original.tsv"
    header, row = vsp.read_text().splitlines()
    vsp.write_text(f"{header}\n{row.rsplit(chr(9), 1)[0]}\ttwo\n")
    with pytest.raises(ValueError, match=r"row 1 \(index 0\), column 'maze_size': expected an integer, got 'two'"):
        load_benchmark("vsp", tmp_path)
    (tmp_path / "VSP_maze_task_main_original.tsv").write_text("index\timage\tquestion\tanswer\tmaze_size\n")
    with pytest.raises(ValueError, match="column 'maze_map' is missing"):
        load_benchmark("vsp", tmp_path)


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
    arguments = ["eval", "--benchmarks", "all", "--data-root", str(root), "--predictions", str(path),
                 "--mode", "text,vt", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"text", "vt"}
    assert results["text"]["vispuzzle"]["accuracy"] == 75.0  # the unanswered item counts as wrong
    assert results["text"]["vispuzzle"]["categories"] == {"demo": 75.0}
    assert results["text"]["vstar"]["categories"] == {"direct_attributes": 100.0}
    assert results["text"]["vsp"]["accuracy"] == 100.0 and results["text"]["vsp"]["tokens"] == 10
    assert math.isclose(results["text"]["average"]["accuracy"], (8 * 100 + 75) / 9)


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
    result = runner.invoke(cli, ["eval", "--benchmarks", "vsp,chartqqa", "--data-root", str(root)])
    assert result.exit_code != 0 and "known benchmarks: blink, blink-jigsaw, chartqa" in result.output
    assert "Did you mean 'chartqa'?" in result.output
    result = runner.invoke(cli, ["eval", "--benchmarks", "frozen-lake", "--data-root", str(root)])
    assert result.exit_code != 0 and "task 'frozen-lake' is not a benchmark" in result.output
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
