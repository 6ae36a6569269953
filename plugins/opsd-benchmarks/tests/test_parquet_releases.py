"""The Hugging Face parquet releases: the same miniature questions read from parquet and from the
VLMEvalKit TSVs give the same items and the same scores; malformed shards are explained."""

from __future__ import annotations

import io
import json
from dataclasses import fields

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from opsd_benchmarks import tasks
from opsd_benchmarks.plugin import BENCHMARKS
from opsd_benchmarks.releases import BLINK_SUBTASKS, RELEASES
from opsd_core.api.benchmarks import BenchmarkItem, BenchmarkTask
from opsd_core.testing import miniature
from opsd_core.testing.cli import cli
from opsd_core.testing.miniature import write_miniature_benchmarks, write_miniature_parquet

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    return write_miniature_benchmarks(base / "tsv", per_benchmark=4), write_miniature_parquet(base / "parquet", per_benchmark=4)


def task(name: str) -> BenchmarkTask:
    return getattr(tasks, BENCHMARKS[name][0])()


def load_benchmark(name: str, root) -> list[BenchmarkItem]:
    return task(name).items(root)


def test_each_release_belongs_to_its_task_and_the_miniature_writes_every_blink_subtask():
    assert {name: task(name).release for name in RELEASES} == RELEASES
    assert miniature.BLINK_SUBTASKS == BLINK_SUBTASKS


def _png(color=(200, 10, 10), size=(6, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _comparable(item: BenchmarkItem) -> dict:
    """Every field but the file it came from, images as (size, pixels)."""
    values = {f.name: getattr(item, f.name) for f in fields(item) if f.name != "source_file"}
    values["images"] = [(image.size, image.tobytes()) for image in item.images]
    values["options"] = dict(item.options)
    values["extra"] = dict(item.extra)
    return values


def test_parquet_and_tsv_copies_give_identical_items(roots):
    tsv_root, parquet_root = roots
    for name in RELEASES:
        from_tsv, from_parquet = load_benchmark(name, tsv_root), load_benchmark(name, parquet_root)
        assert all(item.source_file.endswith(".tsv") for item in from_tsv), name
        assert all(item.source_file.endswith(".parquet") for item in from_parquet), name
        assert [_comparable(i) for i in from_parquet] == [_comparable(i) for i in from_tsv], name


def test_parquet_layouts_and_answer_forms_are_the_release_ones(roots):
    _, parquet_root = roots
    blink = load_benchmark("blink", parquet_root)
    assert {item.category for item in blink} == set(RELEASES["blink"].configs)  # every subtask config pooled
    assert blink[0].source_file == "BLINK/Art_Style/val-00000-of-00001.parquet"
    assert load_benchmark("mmvp", parquet_root)[0].source_file == "MMVP/train-00000-of-00001.parquet"  # flat layout
    cv = load_benchmark("cv-bench", parquet_root)
    assert {item.release_part for item in cv} == {"CV-Bench-2D", "CV-Bench-3D"}
    assert {item.extra["source"] for item in cv} == {"ADE20K", "COCO", "Omni3D"}
    sat = {item.index: item for item in load_benchmark("sat", parquet_root)}
    assert sorted(sat) == [0, 1, 2, 3, 1_000_000, 1_000_001, 1_000_002, 1_000_003]
    assert sat[1_000_000].options == {"A": sat[0].options["B"], "B": sat[0].options["A"]}
    assert sat[1_000_000].answer != sat[0].answer
    vstar = load_benchmark("vstar", parquet_root)[0]
    assert vstar.question == "Which option describes picture 0?" and list(vstar.options) == ["A", "B", "C", "D"]


def _responses(item: BenchmarkItem, position: int) -> str:
    """Gold for most rows, a wrong letter for every third: a mixed score that must agree across formats."""
    wrong = next(letter for letter in item.options if letter != item.answer)
    return f"So the answer is {wrong if position % 3 == 0 else item.answer}."


def test_parquet_and_tsv_copies_score_identically(roots, tmp_path):
    tsv_root, parquet_root = roots
    figures = {}
    for label, root in (("tsv", tsv_root), ("parquet", parquet_root)):
        figures[label] = {}
        for name in RELEASES:
            benchmark = task(name)
            items = benchmark.items(root)
            hits = [benchmark.verdict(item, _responses(item, i)).hit for i, item in enumerate(items)]
            figures[label][name] = benchmark.figures(items, hits)
    assert figures["parquet"] == figures["tsv"]
    assert figures["tsv"]["sat"]["accuracy"] < 100 and figures["tsv"]["cv-bench"]["2d"] < 100

    # Recorded answers reference items by index: the same file re-scores both copies alike.
    path = tmp_path / "predictions.jsonl"
    with open(path, "w") as handle:
        for name in RELEASES:
            handle.writelines(json.dumps({"benchmark": name, "index": item.index, "response": _responses(item, i)}) + "\n" for i, item in enumerate(load_benchmark(name, tsv_root)))
    rescored = {}
    for label, root in (("tsv", tsv_root), ("parquet", parquet_root)):
        out = tmp_path / label
        arguments = ["eval", "--benchmarks", ",".join(RELEASES), "--data-root", str(root), "--predictions", str(path),
                     "--out", str(out)]
        result = CliRunner().invoke(cli, arguments)
        assert result.exit_code == 0, result.output
        rescored[label] = json.loads((out / "results.json").read_text())
    assert rescored["parquet"] == rescored["tsv"]


def test_the_tsv_file_is_preferred_when_both_are_there(tmp_path):
    write_miniature_parquet(tmp_path, per_benchmark=2)
    write_miniature_benchmarks(tmp_path, per_benchmark=2)
    assert {item.source_file for item in load_benchmark("mmvp", tmp_path)} == {"MMVP.tsv"}


def _shard(path, rows, types):
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([(column, types.get(column, pa.string())) for column in rows[0]])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_a_missing_column_names_the_shard_and_the_column(tmp_path):
    shard = tmp_path / "MMVP" / "data" / "train-00000-of-00001.parquet"
    row = {"Index": 1, "Question": "q", "Options": "(a) x (b) y", "image": {"bytes": _png(), "path": None}}
    _shard(shard, [row], {"Index": pa.int64(), "image": IMAGE})
    with pytest.raises(ValueError, match="train-00000-of-00001.parquet: column 'Correct Answer' is missing") as error:
        load_benchmark("mmvp", tmp_path)
    assert str(shard) in str(error.value)


def test_malformed_cells_name_the_row_and_column(tmp_path):
    shard = tmp_path / "vstar-bench" / "data" / "test-00000-of-00001.parquet"
    good = {"image": {"bytes": _png(), "path": None}, "text": "Where?\n(A) left\n(B) right", "label": "right"}
    path_only = dict(good, image={"bytes": None, "path": "x.jpg"})
    _shard(shard, [good, path_only], {"image": IMAGE})
    with pytest.raises(ValueError, match=r"row 1, column 'image'.*bytes stored"):
        load_benchmark("vstar", tmp_path)
    _shard(shard, [good], {"image": IMAGE})
    (item,) = load_benchmark("vstar", tmp_path)
    assert item.answer == "B" and item.options == {"A": "left", "B": "right"}  # an answer given as option text
    _shard(shard, [dict(good, label="up")], {"image": IMAGE})
    with pytest.raises(ValueError, match="answer 'up' is neither an option letter nor one option's text"):
        load_benchmark("vstar", tmp_path)


def test_sat_rotations_cover_every_option(tmp_path):
    shard = tmp_path / "SAT" / "data" / "test-00000-of-00001.parquet"
    row = {"image_bytes": [_png(), _png((0, 0, 255))], "question": "q", "answers": ["w", "x", "y", "z"], "correct_answer_idx": 2}
    types = {"image_bytes": pa.list_(pa.binary()), "answers": pa.list_(pa.string()), "correct_answer_idx": pa.int64()}
    _shard(shard, [row], types)
    items = load_benchmark("sat", tmp_path)
    assert [item.index for item in items] == [0, 1_000_000, 2_000_000, 3_000_000]
    assert all(item.options[item.answer] == "y" and len(item.images) == 2 for item in items)
    assert sorted(item.answer for item in items) == ["A", "B", "C", "D"]
    hits = [item.index != 2_000_000 for item in items]
    assert task("sat").figures(items, hits)["accuracy"] == 0.0  # one wrong rotation fails the question


def test_missing_blink_subtasks_are_listed(tmp_path):
    write_miniature_parquet(tmp_path, per_benchmark=2)
    for shard in (tmp_path / "BLINK" / "Counting").iterdir():
        shard.unlink()
    with pytest.raises(FileNotFoundError, match="no 'val' shards for Counting"):
        load_benchmark("blink", tmp_path)
    assert len(load_benchmark("blink-jigsaw", tmp_path)) == 2  # Jigsaw alone is still complete


def test_missing_files_mention_both_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"MMVP.tsv.*MMVP/data/\*\.parquet"):
        load_benchmark("mmvp", tmp_path)
    with pytest.raises(FileNotFoundError, match="'vsp' has no parquet release"):
        load_benchmark("vsp", tmp_path)
