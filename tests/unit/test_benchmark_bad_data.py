"""Reading benchmark files, and unreadable input giving one line naming the file, the row and
the problem; per-item results and the re-scoring output directory (on the installed benchmark
tasks and the generated miniature files)."""

from __future__ import annotations

import base64
import csv
import io
import json
import random

import pytest
from click.testing import CliRunner
from PIL import Image

from opsd_core.cli import cli
from opsd_core.errors import OpsdError
from opsd_core.evaluation import harness
from opsd_core.evaluation.benchmarks import load_benchmark, read_tsv
from opsd_core.evaluation.items import BenchmarkDataError
from opsd_core.evaluation.miniature import _png, write_miniature_benchmarks

IMAGE = _png(random.Random(0))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_miniature_benchmarks(tmp_path_factory.mktemp("benchmarks"), per_benchmark=2)


def _tsv(path, header, *rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


MCQ = ["index", "image", "question", "A", "B", "answer"]


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        (["index", "image", "question", "A", "B"], [0, IMAGE, "q", "x", "y"], "column 'answer' is missing"),
        (MCQ, ["zero", IMAGE, "q", "x", "y", "A"], r"row 1 \(index zero\), column 'index': .* not an integer"),
        (MCQ, [0, "x" * 100, "q", "x", "y", "A"], r"row 1 \(index 0\), column 'image': not a base64-encoded image"),
        (MCQ, [0, "['abc", "q", "x", "y", "A"], r"column 'image': a list of images"),
        (MCQ, [0, "", "q", "x", "y", "A"], "the image cell is empty"),
        (MCQ, [0, IMAGE, "q", "x", "y", ""], r"column 'answer': the answer cell is empty"),
        (MCQ, [0, IMAGE, "q", "x", "y", "A", "extra"], "row 1 .*different number of tab-separated cells"),
    ],
)
def test_malformed_tsv_rows_name_file_row_and_problem(tmp_path, header, row, message):
    path = _tsv(tmp_path / "VisPuzzle.tsv", header, row)
    with pytest.raises(BenchmarkDataError, match=message) as raised:
        read_tsv(path, "vispuzzle")
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_integer_columns_must_hold_integers(tmp_path):
    header = ["index", "image", "question", "answer", "maze_map", "maze_size"]
    path = _tsv(tmp_path / "maze.tsv", header, [0, IMAGE, "q", "R", "['SG']", "two"])
    with pytest.raises(BenchmarkDataError, match="column 'maze_size': expected an integer, got 'two'"):
        read_tsv(path, "vsp", columns=("maze_map",), integer_columns=("maze_size",))
    path = _tsv(tmp_path / "maze.tsv", header, [0, IMAGE, "q", "R", "['SG']", "07"])
    (item,) = read_tsv(path, "vsp", columns=("maze_map",), integer_columns=("maze_size",))
    assert item.extra == {"maze_map": "['SG']", "maze_size": 7}


def test_a_dangling_back_reference_is_an_error(tmp_path):
    path = _tsv(tmp_path / "VisPuzzle.tsv", MCQ, [0, "7", "q", "x", "y", "A"])
    with pytest.raises(ValueError, match="neither base64 nor the index"):
        read_tsv(path, "vispuzzle")


def test_base64_jpeg_images_decode(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 200, 30)).save(buffer, format="JPEG")
    header = ["index", "image", "question", "A", "B", "answer", "category"]
    row = [5, base64.b64encode(buffer.getvalue()).decode(), "q", "x", "y", "B", "relative_position"]
    (item,) = read_tsv(_tsv(tmp_path / "VStarBench.tsv", header, row), "vstar")
    assert item.images[0].size == (8, 6) and item.category == "relative_position" and item.options == {"A": "x", "B": "y"}


def test_a_malformed_record_is_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"benchmark": "vsp", "response": "x"}\n{"benchmark": "vsp", "index": 0, "response": "x"}\n')
    with pytest.raises(ValueError, match="lacks \\['index'\\]"):
        harness.read_predictions(path)


def test_empty_and_non_utf8_files(tmp_path):
    (tmp_path / "VStarBench.tsv").write_text("")
    with pytest.raises(BenchmarkDataError, match="the file is empty"):
        load_benchmark("vstar", tmp_path)
    (tmp_path / "VStarBench.tsv").write_bytes(b"index\timage\n\xff\xfe\n")
    with pytest.raises(BenchmarkDataError, match="not UTF-8"):
        load_benchmark("vstar", tmp_path)


def test_duplicate_indices_name_both_files(tmp_path):
    _tsv(tmp_path / "CV-Bench-2D.tsv", MCQ, [3, IMAGE, "q", "x", "y", "A"])
    _tsv(tmp_path / "CV-Bench-3D.tsv", MCQ, [3, IMAGE, "q", "x", "y", "B"])
    with pytest.raises(BenchmarkDataError, match="index 3 appears twice .*CV-Bench-2D.tsv and CV-Bench-3D.tsv"):
        load_benchmark("cv-bench", tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"benchmark": "vsp", "index": 0', "line 1: not a JSON object"),
        ('[1, 2]', "line 1: expected a JSON object"),
        ('{"benchmark": "vsp", "response": "x"}', r"line 1: record lacks \['index'\]"),
        ('{"benchmark": "vsp", "index": "first", "response": "x"}', "line 1: index 'first' is not an integer"),
        ('{"benchmark": "vsp", "index": 0, "response": null}', "line 1: benchmark and response must be strings"),
    ],
)
def test_malformed_prediction_lines(tmp_path, line, message):
    path = tmp_path / "predictions.jsonl"
    path.write_text(line + '\n{"benchmark": "vsp", "index": 1, "response": "x"}\n')
    with pytest.raises(BenchmarkDataError, match=message):
        harness.read_predictions(path)


def test_the_cli_turns_bad_data_into_one_line(root, tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"benchmark": "vsp", "index": "x", "response": "a"}\n{"benchmark": "vsp", "index": 1, "response": "x"}\n')
    result = CliRunner().invoke(cli, ["eval", "--benchmarks", "vsp", "--data-root", str(root), "--predictions", str(path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{path}, line 1: index 'x' is not an integer" in result.output
    assert issubclass(BenchmarkDataError, OpsdError)
    good = tmp_path / "good.jsonl"
    good.write_text('{"benchmark": "vispuzzle", "index": 0, "response": "A"}\n')
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    _tsv(bad_root / "VisPuzzle.tsv", MCQ, [0, "not-an-image-but-long-enough" * 4, "q", "x", "y", "A"])
    result = CliRunner().invoke(cli, ["eval", "--benchmarks", "vispuzzle", "--data-root", str(bad_root), "--predictions",
                                      str(good), "--out", str(tmp_path / "out2")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "VisPuzzle.tsv, row 1 (index 0), column 'image': not a base64-encoded image" in result.output


def test_items_jsonl_and_the_rescoring_directory(root, tmp_path, monkeypatch):
    answers = tmp_path / "run" / "predictions.jsonl"
    answers.parent.mkdir()
    lines = [
        {"benchmark": "sat", "index": 0, "response": "<answer>A</answer>", "tokens": 3},
        {"benchmark": "chartqa", "index": 0, "response": "Round_0: <answer>10</answer>"},
    ]
    answers.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.chdir(tmp_path)
    arguments = ["eval", "--benchmarks", "sat,chartqa", "--data-root", str(root), "--predictions", str(answers)]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    assert not (answers.parent / "results.json").exists()  # never beside the predictions
    out = tmp_path / "rescored-run"
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    sat = next(item for item in items if item["benchmark"] == "sat" and item["index"] == 0)
    assert sat["rule"] == "circular:no-answer" and sat["hit"] is False and sat["question_hit"] is False
    assert sat["tokens"] == 3 and sat["judge"] is None and sat["extracted"] is None
    chart = next(item for item in items if item["benchmark"] == "chartqa" and item["index"] == 0)
    assert chart["extracted"] == "10" and chart["rule"] == "answer-tag:prediction-relative" and chart["hit"] is True
    unanswered = [item for item in items if item["response"] is None]
    assert unanswered and all(item["rule"] == "unanswered" and not item["hit"] for item in unanswered)

    again = CliRunner().invoke(cli, arguments)  # a second run gets a new directory
    assert again.exit_code == 0 and (tmp_path / "rescored-run-2" / "items.jsonl").is_file()
    refused = CliRunner().invoke(cli, [*arguments, "--out", str(out)])
    assert refused.exit_code != 0 and "--force" in refused.output
    forced = CliRunner().invoke(cli, [*arguments, "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    training_run = tmp_path / "a-training-run"
    training_run.mkdir()
    (training_run / "config.toml").write_text("")
    (training_run / "results.json").write_text("{}")
    into_run = CliRunner().invoke(cli, [*arguments, "--out", str(training_run), "--force"])
    assert into_run.exit_code != 0 and "training run directory" in into_run.output
    assert (training_run / "results.json").read_text() == "{}"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"benchmark": "vps", "index": 0, "response": "A"}, "benchmark 'vps', which is not installed"),
        ({"benchmark": "vsp", "index": 987654, "response": "A"}, "vsp index 987654, which its data has no item with"),
        ({"benchmark": "vsp", "index": 0, "response": "A", "mode": "image"}, "mode 'image' is not one of text, vt"),
    ],
)
def test_predictions_the_data_cannot_place_are_one_line_not_dropped(root, tmp_path, record, message):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"benchmark": "vsp", "index": 0, "response": "x"}) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["eval", "--benchmarks", "all", "--data-root", str(root), "--predictions", str(path), "--out", str(out)]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in result.output, result.output
    assert not (out / "results.json").exists()


def test_a_header_without_rows_is_refused(tmp_path):
    _tsv(tmp_path / "VStarBench.tsv", MCQ)
    with pytest.raises(BenchmarkDataError, match="the header is there but no row follows"):
        load_benchmark("vstar", tmp_path)
