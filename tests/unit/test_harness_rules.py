"""The paper harness's scoring rules on hand-made tricky responses, one group per rule family."""

from __future__ import annotations

import pytest

from opsd_core.evaluation import rules

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


def choice(response: str, gold: str = "B") -> rules.Verdict:
    return rules.multiple_choice(response, OPTIONS, gold)


@pytest.mark.parametrize(
    ("response", "extracted", "rule"),
    [
        ("Cannot determine the answer. <answer>B</answer>", "Z", "response:rejection-phrase"),
        ("I'm sorry, but without the image provided I guess B", "Z", "response:rejection-phrase"),
        ("cannot determine the answer, so B", "B", "response:option-letter"),  # the phrases are case-sensitive
        ("Failed to obtain answer via API. Cannot determine the answer", None, "no-answer"),
    ],
)
def test_rejection_phrases(response, extracted, rule):
    verdict = choice(response)
    assert (verdict.rule, verdict.hit) == (rule, extracted == "B")
    if extracted is not None:
        assert verdict.extracted == extracted


@pytest.mark.parametrize(
    ("response", "extracted", "rule"),
    [
        ("Z", "Z", "response:standalone-z"),
        ("None fits, answer Z. <answer>B</answer>", "Z", "response:standalone-z"),  # Z stops the tag
        ("Z or B? B.", "B", "response:option-letter"),  # an option letter wins over Z
        ("Zebra crossing. <answer>B</answer>", "B", "answer-tag:option-letter"),
        ("nothing at all", "Z", "no-answer"),
    ],
)
def test_standalone_z_and_no_answer(response, extracted, rule):
    verdict = choice(response)
    assert (verdict.extracted, verdict.rule) == (extracted, rule)


@pytest.mark.parametrize(
    ("response", "extracted", "rule"),
    [
        ("<ANSWER>B</ANSWER>", "Z", "no-answer"),  # the tag is case-sensitive
        ("red or blue? <Answer>B</Answer>", "Z", "no-answer"),
        ("A looks close, but \\boxed{B}", "B", "boxed:option-letter"),  # two letters in the response: the box decides
        ("\\boxed{B} it is", "B", "response:option-letter"),  # braces split tokens: the response itself names B
        ("<answer>A</answer> on reflection <answer>B</answer>", "A", "answer-tag:option-letter"),  # the first tag
        ("<answer>B", "Z", "no-answer"),  # an unclosed tag is no tag
        ("A looks close, but <answer></answer> \\boxed{B}", "Z", "no-answer"),  # an empty tag hides the box
        ("\\boxed{A} then \\boxed{B}", "A", "boxed:option-letter"),  # the first boxed
        ("A or B, hmm. \\boxed{\\text{C}}", "C", "boxed:option-letter"),  # the content stops at the first }
    ],
)
def test_answer_tags_and_boxed(response, extracted, rule):
    verdict = choice(response)
    assert (verdict.extracted, verdict.rule) == (extracted, rule)


@pytest.mark.parametrize(
    ("response", "extracted"),
    [
        ("A is wrong. The answer is B", None),  # two letters
        ("B is right because the sky looks this way today", None),  # the letter is not in the last four tokens
        ("(B)", "B"),
        ("b", None),  # letters are case-sensitive
        ("It is blue.", "B"),  # option text
        ("blue or green", None),  # two option texts
        ("the colour of the sky on a clear day, which is blue", None),  # longer than twice the option texts
    ],
)
def test_letters_and_option_texts(response, extracted):
    letter, _ = rules.infer_option(response, OPTIONS)
    assert letter == extracted


def test_numeric_option_texts_are_rendered_as_the_harness_table_reader_renders_them():
    assert rules.render_column(["6", "7", "12"]) == ["6", "7", "12"]
    assert rules.render_column(["6", "", "12"]) == ["6.0", None, "12.0"]  # a missing cell makes the column float
    assert rules.render_column(["6", "7.5"]) == ["6.0", "7.5"]
    assert rules.render_column(["06", "1"]) == ["6", "1"]
    assert rules.render_column(["6", "six"]) == ["6", "six"]
    assert rules.render_column(["None", "NA", "x"]) == [None, None, "x"]
    options = dict(zip("AB", rules.render_column(["6", "7.5"])))
    assert rules.multiple_choice("6.0 apples", options, "A").extracted == "A"
    assert rules.multiple_choice("6 apples", options, "A").extracted == "Z"


def test_circular_copies_match_the_whole_response_only():
    assert rules.circular_copy("The answer is B.", OPTIONS, "B").hit
    verdict = rules.circular_copy("<answer>B</answer>", OPTIONS, "B")
    assert not verdict.hit and verdict.rule == "circular:no-answer"
    assert not rules.circular_copy("Cannot determine the answer", OPTIONS, "B").hit


MAZE = "['SFF', 'FHF', 'FFG']"


@pytest.mark.parametrize(
    ("response", "hit", "moves"),
    [
        ("\\boxed{R, R, D, D}", True, "R,R,D,D"),
        ("\\boxed{r, r, d, d}", False, None),  # lower-case moves are not read
        ("\\boxed{R R D D}", False, None),  # moves must be comma-separated
        ("\\boxed{D,D,R,R} no wait \\boxed{R,D}", False, "R,D"),  # the last valid box counts
        ("\\boxed{D,D,R,R} \\boxed{left}", True, "D,D,R,R"),  # an invalid later box is skipped
        ("\x08oxed{D,D,R,R}", True, "D,D,R,R"),  # \b read through JSON as a backspace
        ("\\\\boxed{D,D,R,R}", True, "D,D,R,R"),
        ("\\boxed{R,D,D,R}", False, "R,D,D,R"),  # through the hole
        ("\\boxed{R,R,D,D,D}", False, "R,R,D,D,D"),  # off the grid
        ("\\boxed{R,R,D,D,L,R}", True, "R,R,D,D,L,R"),  # leaves G and comes back
        ("\\boxed{ R,R,D,D}", False, None),  # a space after the brace
    ],
)
def test_vsp_moves(response, hit, moves):
    verdict = rules.vsp(response, MAZE, 3)
    assert (verdict.hit, verdict.extracted) == (hit, moves)


def test_vsp_maze_rows_and_side():
    assert rules.maze_rows('["SFG"]') == []  # only single-quoted rows are read
    assert not rules.vsp("\\boxed{R}", '["SG"]', 2).hit
    assert not rules.walk_maze(["SG"], "R", 1)  # the side bounds the walk, not the row length
    assert not rules.walk_maze(["SF"], "R", 2)  # no goal


@pytest.mark.parametrize(
    ("response", "golds", "hit"),
    [
        ("<answer>100</answer>", "104", True),
        ("<answer>100</answer>", "105.2", False),  # 5.2 % of the prediction
        ("<answer>95.3</answer>", "100", True),  # |100-95.3|/95.3 = 4.9 % (gold-relative: 4.7 %)
        ("<answer>1,000</answer>", "1000", False),  # thousands separators are text
        ("<answer>1000</answer>", "1,000", False),
        ("<answer>0</answer>", "0", True),
        ("<answer>0.0</answer>", "0", False),  # a zero prediction compares as text
        ("<answer>0.01</answer>", "0", False),
        ("<answer>12%</answer>", "0.12", True),
        ("<answer>Yes</answer>", "yes", True),
        ("<answer> 7 </answer> <answer>9</answer>", ["9", "7"], True),  # the first tag, any gold
        ("Round_0: <answer>7</answer>", "7", True),
        ("<ANSWER>7</ANSWER>", "7", False),  # no tag: the whole response is compared
        ("7", "7", True),
        ("<answer>1e2</answer>", "100", True),
    ],
)
def test_chartqa_relaxed_accuracy_as_the_harness_computes_it(response, golds, hit):
    assert rules.chartqa(response, golds).hit == hit


def test_chartqa_gold_relative_is_an_option():
    assert rules.chartqa("<answer>95.3</answer>", "100").hit
    assert rules.chartqa("<answer>95.3</answer>", "100", gold_relative=True).hit
    assert not rules.chartqa("<answer>95</answer>", "100.1", gold_relative=False).hit
    assert rules.chartqa("<answer>0</answer>", "0.0", gold_relative=True).rule == "answer-tag:gold-relative"
    assert rules.chartqa("<answer>105</answer>", "100").rule == "answer-tag:prediction-relative"
    assert rules.chartqa("<answer>105</answer>", "100", gold_relative=True).hit
    assert not rules.chartqa("<answer>100</answer>", "105.2").hit
    assert not rules.chartqa("<answer>100</answer>", "95", gold_relative=True).hit  # 5.3 % of the gold
