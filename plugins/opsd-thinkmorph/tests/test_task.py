"""The ThinkMorph data task on tiny parquet datasets written here in the released layout."""

import io
import subprocess
import sys
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from opsd_thinkmorph import task as task_module
from opsd_thinkmorph.task import (
    DataLayoutError,
    ThinkMorphDataTask,
    composite_rgb,
    moves,
    question_options,
    score_answer,
)
from opsd_thinkmorph.demo_data import SCHEMA
from opsd_thinkmorph.task_params import ThinkMorphDataParams

DATASETS = ["Visual_Search", "Spatial_Navigation", "Chart_Refocus"]
# Visual_Search p1 has an RGBA problem image, p2 an empty answer, p3 no thought text, p4 an
# undecodable visual thought.
SKIPPED = {"Visual_Search/p2", "Visual_Search/p3"}
ALL_IDS = {f"Visual_Search/p{i}" for i in range(6)} | {f"{name}/p{i}" for name in DATASETS[1:] for i in range(3)}


def png(colour, mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def rgba_png():
    picture = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    picture.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue: must become white
    picture.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black: must become mid grey
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def row(pid, answer="A", **changes):
    record = {
        "pid": pid,
        "question": f"Question {pid}? (A) yes (B) no",
        "answer": answer,
        "problem_image_0": {"bytes": png("green"), "path": f"{pid}.png"},
        "resoning_thought_0": "first thought",
        "reasoning_image_0": {"bytes": png("blue"), "path": f"{pid}_vt.png"},
        "resoning_thought_1": "second thought",
        "task": "demo",
        "full_text_only_thought": "all in text",
    }
    record.update(changes)
    return record


def write(path, rows, schema=SCHEMA, row_group_size=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("thinkmorph")
    search = [
        row("p0"),
        row("p1", problem_image_0={"bytes": rgba_png(), "path": "p1.png"}),
        row("p2", answer="  "),
        row("p3", resoning_thought_0=None, resoning_thought_1=""),
        row("p4", reasoning_image_0={"bytes": b"not an image", "path": "p4_vt.png"}),
        row("p5", answer="B", full_text_only_thought="  "),
    ]
    write(base / "Visual_Search/data/train-00000-of-00002.parquet", search[:4])
    write(base / "Visual_Search/data/train-00001-of-00002.parquet", search[4:])
    write(base / "Visual_Search/data/test-00000-of-00001.parquet", [row("held-elsewhere")])
    write(base / "Spatial_Navigation/data/train-00000-of-00001.parquet", [row(f"p{i}", "L, D, R") for i in range(3)])
    write(base / "Chart_Refocus/data/train-00000-of-00001.parquet", [row(f"p{i}", "100") for i in range(3)])
    return base


def make(root, **changes):
    params = {"root": str(root), "datasets": DATASETS, "num_used": [], **changes}
    return ThinkMorphDataTask(ThinkMorphDataParams(**params))


def epoch_ids(task, seed=0):
    usable = sum(task.usable(ref) for ref in task.train_rows)
    return [problem.id for problem in islice(task.train_problems(seed), usable)]


# ---------------------------------------------------------------- enumeration
def test_rows_are_enumerated_from_train_files_only(root):
    task = make(root)
    assert [source.path.name for source in task.sources][:2] == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    assert len(task.train_rows) == 12 and task.eval_rows == ()


def test_caps_take_the_first_rows_across_files(root):
    task = make(root, num_used=[5, 2, 1])
    taken = {(task.sources[ref.source].dataset, task.sources[ref.source].path.name, ref.row) for ref in task.train_rows}
    assert taken == {
        *{("Visual_Search", "train-00000-of-00002.parquet", r) for r in range(4)},
        ("Visual_Search", "train-00001-of-00002.parquet", 0),
        ("Spatial_Navigation", "train-00000-of-00001.parquet", 0),
        ("Spatial_Navigation", "train-00000-of-00001.parquet", 1),
        ("Chart_Refocus", "train-00000-of-00001.parquet", 0),
    }


def test_construction_reads_footers_only(root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a table was read at construction")

    monkeypatch.setattr(task_module.pq, "read_table", refuse)
    monkeypatch.setattr(task_module.pq, "ParquetFile", refuse)
    assert len(make(root).train_rows) == 12


# ---------------------------------------------------------------- rows and skipping
def test_skipped_rows_never_appear_and_ids_are_unique_across_datasets(root):
    ids = epoch_ids(make(root))
    assert len(ids) == len(set(ids)) == 10
    assert set(ids) == ALL_IDS - SKIPPED
    assert {"Visual_Search/p0", "Spatial_Navigation/p0", "Chart_Refocus/p0"} <= set(ids)


def test_problem_fields_and_metadata(root):
    task = make(root)
    problems = {problem.id: problem for problem in islice(task.train_problems(0), 10)}
    first = problems["Spatial_Navigation/p1"]
    assert first.image.mode == "RGB" and first.image.getpixel((0, 0)) == (0, 128, 0)
    assert first.visual_thought.mode == "RGB" and first.visual_thought.getpixel((0, 0)) == (0, 0, 255)
    assert first.question == "Question p1? (A) yes (B) no" and first.reference_answer == "L, D, R"
    assert first.metadata == {
        "dataset": "Spatial_Navigation",
        "pid": "p1",
        "task": "demo",
        "thoughts": ["first thought", "second thought"],
        "reference_images": 1,
    }
    broken = problems["Visual_Search/p4"]
    assert broken.visual_thought is None and broken.metadata["reference_images"] == 0


def test_the_reference_trace_is_the_text_only_thought_and_the_answer(root):
    problems = {problem.id: problem for problem in islice(make(root).train_problems(0), 10)}
    assert problems["Spatial_Navigation/p1"].reference_trace == "<think>all in text</think><answer>L, D, R</answer>"
    assert problems["Visual_Search/p5"].reference_trace is None  # a blank cell gives no trace


def test_alpha_is_composited_on_white(root):
    problem = next(p for p in islice(make(root).train_problems(0), 10) if p.id == "Visual_Search/p1")
    assert problem.image.mode == "RGB"
    assert problem.image.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(channel - 127) <= 1 for channel in problem.image.getpixel((1, 0)))
    assert problem.image.getpixel((2, 2)) == (255, 0, 0)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert composite_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    assert composite_rgb(palette).getpixel((1, 0)) == (255, 0, 0)


def test_an_undecodable_problem_image_names_the_file_and_row(tmp_path):
    write(tmp_path / "Broken/data/train-00000-of-00001.parquet", [row("q0", problem_image_0={"bytes": b"x"})])
    task = make(tmp_path, datasets=["Broken"])
    with pytest.raises(ValueError, match=r"train-00000-of-00001\.parquet row 0 \(pid 'q0'\): problem_image_0"):
        next(task.train_problems(0))


# ---------------------------------------------------------------- order and resume
def test_order_is_fixed_by_the_seed_and_reshuffled_every_epoch(root):
    two_epochs = [p.id for p in islice(make(root).train_problems(0), 20)]
    assert two_epochs == [p.id for p in islice(make(root).train_problems(0), 20)]
    assert two_epochs != [p.id for p in islice(make(root).train_problems(1), 20)]
    assert set(two_epochs[:10]) == set(two_epochs[10:]) and two_epochs[:10] != two_epochs[10:]


@pytest.mark.parametrize("start", [1, 4, 10, 13, 27])
def test_resuming_at_a_position_continues_the_unbroken_stream(root, start):
    unbroken = [p.id for p in islice(make(root).train_problems(3), start + 6)]
    resumed = [p.id for p in islice(make(root).train_problems(3, start=start), 6)]
    assert resumed == unbroken[start:]


# ---------------------------------------------------------------- evaluation split
def test_eval_split_is_stable_disjoint_and_excluded_from_training(root):
    task = make(root, eval_fraction=0.4)
    again = make(root, eval_fraction=0.4)
    assert task.eval_rows == again.eval_rows and 0 < len(task.eval_rows) < 12
    assert set(task.eval_rows).isdisjoint(task.train_rows)
    assert len(task.eval_rows) + len(task.train_rows) == 12
    eval_ids = [p.id for p in task.eval_problems()]
    assert eval_ids == [p.id for p in again.eval_problems()]
    assert len(set(eval_ids)) == len(eval_ids) and not set(eval_ids) & SKIPPED
    assert set(eval_ids).isdisjoint(epoch_ids(task))
    assert [p.id for p in task.eval_problems(limit=2)] == eval_ids[:2]
    assert len(make(root, eval_fraction=0.4, eval_size=1).eval_problems()) == 1
    assert make(root, eval_fraction=0.4, shuffle_seed=7).eval_rows != task.eval_rows


def test_no_eval_fraction_means_no_eval_problems_and_says_so(root):
    with pytest.raises(ValueError, match="no evaluation problems with eval_fraction = 0"):
        make(root).eval_problems()


# ---------------------------------------------------------------- layout errors
def test_missing_root_names_the_path_and_the_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataLayoutError, match=r"nowhere.*<root>/<Task>/data/train-00000-of-0000N\.parquet"):
        make(missing)


def test_missing_dataset_names_its_directory_and_the_folders_present(root):
    with pytest.raises(DataLayoutError) as error:
        make(root, datasets=["Visual_Search", "Jigsaw_Assembly"])
    message = str(error.value)
    assert str(root / "Jigsaw_Assembly" / "data") in message
    assert "Visual_Search" in message and "problem_image_0" in message


def test_dataset_without_matching_parquet_names_the_pattern(root):
    with pytest.raises(DataLayoutError) as error:
        make(root, datasets=["Visual_Search"], split_pattern="validation")
    message = str(error.value)
    assert "'validation'" in message and str(root / "Visual_Search" / "data") in message
    assert "test-00000-of-00001.parquet" in message


def test_missing_columns_are_named_with_the_file(tmp_path):
    schema = pa.schema([field for field in SCHEMA if field.name != "reasoning_image_0"])
    path = tmp_path / "Jigsaw_Assembly/data/train-00000-of-00001.parquet"
    write(path, [{k: v for k, v in row("p0").items() if k != "reasoning_image_0"}], schema=schema)
    with pytest.raises(DataLayoutError) as error:
        make(tmp_path, datasets=["Jigsaw_Assembly"])
    message = str(error.value)
    assert str(path) in message and "missing columns ['reasoning_image_0']" in message
    assert "pid, question, answer, problem_image_0, reasoning_image_0" in message


# ---------------------------------------------------------------- params
def test_params_reject_a_num_used_of_the_wrong_length():
    with pytest.raises(ValidationError, match="num_used has 2 entries but datasets has 4"):
        ThinkMorphDataParams(root="/data", num_used=[1, 2])


def test_params_defaults_follow_the_paper_and_every_field_is_described():
    params = ThinkMorphDataParams(root="/data")
    assert params.datasets == ["Visual_Search", "Spatial_Navigation", "Jigsaw_Assembly", "Chart_Refocus"]
    assert params.num_used == [6990, 6000, 6000, 6000] and params.eval_fraction == 0.0
    assert all(field.description for field in ThinkMorphDataParams.model_fields.values())
    with pytest.raises(ValidationError, match="root"):
        ThinkMorphDataParams()
    with pytest.raises(ValidationError, match="extra"):
        ThinkMorphDataParams(root="/data", shuffle=True)
    with pytest.raises(ValidationError, match="more than once"):
        ThinkMorphDataParams(root="/data", datasets=["A", "A"], num_used=[])


def test_params_import_stays_light():
    code = "import sys, opsd_thinkmorph.task_params; print(sorted({'torch', 'pyarrow', 'PIL'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# ---------------------------------------------------------------- scoring
def test_score_uses_the_rows_answer(root):
    problems = {p.id: p for p in islice(make(root).train_problems(0), 10)}
    task = make(root)
    assert task.score(problems["Visual_Search/p0"], "<think>(B) looks off</think><answer>A</answer>").correct
    assert not task.score(problems["Visual_Search/p5"], "<answer>(A) yes</answer>").correct
    assert task.score(problems["Visual_Search/p5"], "<answer>no</answer>").extracted == "B"
    assert task.score(problems["Spatial_Navigation/p0"], r"<answer>\boxed{L, D, R}</answer>").correct
    assert not task.score(problems["Spatial_Navigation/p0"], "<answer>L, R, D</answer>").correct
    assert task.score(problems["Chart_Refocus/p0"], "<answer>103</answer>").correct  # relaxed 5 %


@pytest.mark.parametrize(
    "response, reference, correct, extracted",
    [
        ("<answer>The Red Car.</answer>", "the red car", True, "the red car"),
        ("<answer>1,000</answer>", "1000", True, "1,000"),
        ("<answer>103</answer>", "100", False, "103"),  # exact outside Chart_Refocus
        (r"so \boxed{42}", "42", True, "42"),
        ("the red car", "the red car", False, None),  # no answer tag or box
        ("I pick B", "(B)", True, "B"),  # letters fall back to the whole response
        ("<answer>up, left</answer>", "U L", True, "U, L"),
    ],
)
def test_score_answer_rules(response, reference, correct, extracted):
    score = score_answer(response, reference)
    assert (score.correct, score.value, score.extracted) == (correct, float(correct), extracted)


def test_a_letter_outside_the_parsed_options_is_still_scored():
    assert score_answer("<answer>C</answer>", "C", question="Which? (A) x (B) y").correct


def test_question_options_and_moves():
    assert question_options("Which? (A) red (B) blue") == {"A": "red", "B": "blue"}
    assert question_options("Which?\nA. red\nB. blue\n") == {"A": "red", "B": "blue"}
    assert question_options("Plan A. Then (B) only") == {}
    assert moves("L -> D -> R") == ["L", "D", "R"] and moves("left, turn") is None
