"""The tasks' lenient answer extraction and relaxed matching, and the benchmark aggregations, on hand-made tricky strings."""

import pytest

from opsd_core.evaluation.answers import (
    answer_tag,
    boxed,
    extract_choice,
    infer_option_letter,
    infer_option_text,
)
from opsd_core.evaluation.benchmarks import BenchmarkItem, circular_groups
from opsd_core.evaluation.scorers import mean_of_group_accuracies, pair_accuracy, relaxed_correct

OPTIONS = {"A": "red square", "B": "blue circle", "C": "green triangle", "D": "none"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><answer> B </answer>", "B"),
        ("<answer>A</answer> then <ANSWER>C</ANSWER>", "C"),
        ("<answer>multi\nline</answer>", "multi\nline"),
        ("no tag <answer>unclosed", None),
    ],
)
def test_answer_tag(text, expected):
    assert answer_tag(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}", "42"),
        (r"\boxed{1} and finally \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{L, R, D}", "L, R, D"),
        (r"\boxed{unclosed", None),
        ("nothing", None),
    ],
)
def test_boxed(text, expected):
    assert boxed(text) == expected


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("(C)", "C"),
        ("The answer is B.", "B"),
        ("**Answer: D**", "D"),
        ("A square is red, so the answer is B", None),  # A and B both standalone: ambiguous
        ("A", "A"),
        ("B or C", None),  # two letters
        ("B is my guess because the shape has four sides and it is blue", None),  # not in the last four tokens
        ("E", None),  # not an option
        ("", None),
    ],
)
def test_infer_option_letter(prediction, expected):
    assert infer_option_letter(prediction, OPTIONS) == expected


def test_infer_option_text():
    assert infer_option_text("it is the Blue Circle", OPTIONS) == "B"
    assert infer_option_text("red square or blue circle", OPTIONS) is None
    assert infer_option_text("x" * 200 + " blue circle", OPTIONS) is None  # too long to trust


def test_extract_choice_falls_back_to_tag_then_boxed():
    assert extract_choice("<think>compare A and B carefully, then decide</think><answer>C</answer>", OPTIONS) == "C"
    assert extract_choice(r"I pick \boxed{D}", OPTIONS) == "D"
    assert extract_choice("I cannot tell", OPTIONS) is None


@pytest.mark.parametrize(
    "prediction, gold, swapped, correct",
    [
        ("104", "100", False, True),
        ("105", "100", False, True),
        ("106", "100", False, False),
        ("95.2", "100", True, False),  # 4.8 / 95.2 = 0.0504 of the prediction
        ("1,050", "1000", False, True),
        ("45%", "0.45", False, True),
        ("0", "0", False, True),
        ("0.01", "0", False, False),
        ("Yes", "yes", False, True),
        ("blue", "red", False, False),
    ],
)
def test_relaxed_correct(prediction, gold, swapped, correct):
    assert relaxed_correct(prediction, gold, swapped=swapped) is correct


def test_gold_relative_and_swapped_forms_differ():
    # 4.9 % of the gold but 5.15 % of the prediction.
    assert relaxed_correct("95.1", "100") is True
    assert relaxed_correct("95.1", "100", swapped=True) is False


def test_circular_grouping_needs_every_rotation():
    indices = [5, 1_000_005, 2_000_005, 7, 1_000_007, 1_000_009]
    items = [BenchmarkItem("sat", index, "SAT_circular.tsv", (), "q", {}, "A") for index in indices]
    groups = circular_groups(items, [True, True, False, True, True, True])
    assert groups == {5: False, 7: True}  # 9 has no question row of its own: it is not a question


def test_per_source_averaging_weights_sources_equally():
    hits = {1: True, 2: True, 3: True, 4: False}
    sources = {1: "ade", 2: "ade", 3: "ade", 4: "coco"}
    assert mean_of_group_accuracies(hits, sources) == pytest.approx((1.0 + 0.0) / 2)


def test_pair_accuracy():
    assert pair_accuracy({1: True, 2: True, 3: True, 4: False}) == 0.5
