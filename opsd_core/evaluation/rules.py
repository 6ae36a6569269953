"""The scoring rules of the paper's evaluation harness, one function per rule, judge-free.

Owns: how the harness (a VLMEvalKit fork, in its ``exact_matching`` mode) turns a response into
an extracted answer and a hit for each kind of benchmark: multiple-choice letters and option
texts with its rejection phrases and its ``Z`` (no answer), the first ``<answer>`` tag or first
``\\boxed{}``, the whole-response-only matching of circular questions, VSP's boxed moves walked on
the maze, ChartQA's relaxed accuracy (relative to the prediction, as the harness computes it;
gold-relative as a named option), and how the harness's table reader renders a column's cells
(``6`` becomes ``6.0`` in a column with a missing cell). Every verdict names the rule that decided.
docs/scoring.md states each rule and where the harness applies it.
Does not know: files, prompts, aggregation or models; every function is pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

NO_ANSWER = "Z"
REJECTION_PHRASES = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
API_FAILURE = "Failed to obtain answer via API"
ROUND_MARKERS = ("Round_0:", "Round_1:")
# Cells the harness's table reader (pandas' defaults) reads as missing.
MISSING_CELLS = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
     "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
)
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_INTEGER_CELL = re.compile(r"[+-]?\d+")
_DECIMAL_CELL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?inf(inity)?", re.IGNORECASE)
_FIRST_BOXED = re.compile(r"\\boxed\{([^}]*)\}")
_BOXED_MOVES = re.compile(r"\\{1,2}boxed\{([RLUD](?:\s*,\s*[RLUD])*)\}")
_QUOTED_ROW = re.compile(r"'([^']+)'")
_STEPS = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}


@dataclass(frozen=True)
class Verdict:
    """How one response was scored.

    Attributes:
        hit: whether it counts as correct.
        extracted: the answer compared with the gold (an option letter, ``Z``, moves ``R,D``,
            a ChartQA string), or None when nothing was extracted.
        rule: the rule that decided, ``<where>:<how>`` (``response:option-letter``,
            ``answer-tag:option-text``, ``response:rejection-phrase``, ``no-answer``, ...).
    """

    hit: bool
    extracted: str | None
    rule: str


# ---------------------------------------------------------------------------------------------- table cells
def render_column(cells: Sequence[str]) -> list[str | None]:
    """A TSV column's cells as the harness sees them after its table reader: missing markers
    (:data:`MISSING_CELLS`) become None; a column whose every cell is an integer renders each as
    ``int`` (``"07"`` -> ``"7"``); a column of numbers with a decimal, an exponent or a missing
    cell renders each as ``float`` (``"6"`` -> ``"6.0"``); any other column keeps its text."""
    present = [cell for cell in cells if cell not in MISSING_CELLS]
    if present and len(present) == len(cells) and all(_INTEGER_CELL.fullmatch(cell) for cell in present):
        return [str(int(cell)) for cell in cells]
    if present and all(_DECIMAL_CELL.fullmatch(cell) for cell in present):
        return [None if cell in MISSING_CELLS else str(float(cell)) for cell in cells]
    return [None if cell in MISSING_CELLS else cell for cell in cells]


# ---------------------------------------------------------------------------------------------- multiple choice
def option_by_letter(text: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    """(letter, how) by the harness's letter rule, or (None, "") when it gives nothing.

    A rejection phrase anywhere (case-sensitive) gives ``Z``. Else ``.()[],:;!*#{}`` become
    spaces and the text is split on whitespace: when exactly one option letter is a token
    (case-sensitive) and its first occurrence is among the last four tokens, that letter; when no
    option letter is a token but ``Z`` is, ``Z``. A text holding the API-failure marker skips
    this rule.
    """
    if API_FAILURE in text:
        return None, ""
    if any(phrase in text for phrase in REJECTION_PHRASES):
        return NO_ANSWER, "rejection-phrase"
    tokens = text.translate(_SEPARATORS).split()
    named = [letter for letter in options if letter in tokens]
    if len(named) == 1 and tokens.index(named[0]) > len(tokens) - 5:
        return named[0], "option-letter"
    if not named and NO_ANSWER in tokens:
        return NO_ANSWER, "standalone-z"
    return None, ""


def option_by_text(text: str, options: Mapping[str, str]) -> str | None:
    """The letter whose option text occurs in ``text`` (both lower-cased), when exactly one does
    and the lower-cased text is at most twice as long as all option texts together."""
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(str(value)) for value in options.values()):
        return None
    found = [letter for letter, value in options.items() if str(value).lower() in lowered]
    return found[0] if len(found) == 1 else None


def infer_option(text: str, options: Mapping[str, str]) -> tuple[str | None, str]:
    """(letter or ``Z``, how): the letter rule, then the option-text rule; (None, "") if neither."""
    letter, how = option_by_letter(text, options)
    if letter is not None:
        return letter, how
    by_text = option_by_text(text, options)
    return (by_text, "option-text") if by_text is not None else (None, "")


def first_answer_tag(text: str) -> str | None:
    """The text after the first ``<answer>`` up to the next ``</answer>`` (or the next
    ``<answer>``, or the end), unstripped, when the text holds both tags (case-sensitive)."""
    if "<answer>" not in text or "</answer>" not in text:
        return None
    after = text.split("<answer>", 2)[1]
    return after.split("</answer>", 1)[0]


def first_boxed(text: str) -> str | None:
    r"""The stripped content of the first ``\boxed{...}`` without nested braces, or None."""
    found = _FIRST_BOXED.search(text)
    return found.group(1).strip() if found else None


def multiple_choice(response: str, options: Mapping[str, str], gold: str) -> Verdict:
    """A multiple-choice response: the whole response first (letter, then text); if that gives
    nothing, the first answer tag when both tags are there, else the first boxed content; if
    that gives nothing too, ``Z``. Hit when the result equals ``gold`` exactly."""
    letter, how = infer_option(response, options)
    if letter is not None:
        return Verdict(letter == gold, letter, f"response:{how}")
    tagged = first_answer_tag(response)
    inner, where = (tagged, "answer-tag") if tagged is not None else (
        first_boxed(response) if "boxed" in response else None, "boxed"
    )
    if inner:
        letter, how = infer_option(inner, options)
        if letter is not None:
            return Verdict(letter == gold, letter, f"{where}:{how}")
    return Verdict(gold == NO_ANSWER, NO_ANSWER, "no-answer")


def circular_copy(response: str, options: Mapping[str, str], gold: str) -> Verdict:
    """One option-rotated copy of a circular question: only the whole response is matched (no
    answer tag, no boxed); without a letter the harness would ask its judge, so exact matching
    counts it wrong."""
    letter, how = infer_option(response, options)
    if letter is None:
        return Verdict(False, None, "circular:no-answer")
    return Verdict(letter == gold, letter, f"circular:{how}")


# ---------------------------------------------------------------------------------------------- VSP
def vsp_moves(response: str) -> str | None:
    r"""The moves ``R,D,D`` of the last ``\boxed{...}`` (one or two backslashes) that holds only
    upper-case U/D/L/R separated by commas; a backspace character counts as ``\b`` (a ``\boxed``
    read through JSON)."""
    found = _BOXED_MOVES.findall(response.replace("\x08", "\\b"))
    return re.sub(r"\s+", "", found[-1]).strip(",") if found else None


def maze_rows(maze_map: str) -> list[str]:
    """The rows of a maze map cell: its single-quoted strings (``"['SFF', 'FHF', 'FFG']"``)."""
    return _QUOTED_ROW.findall(maze_map)


def walk_maze(rows: Sequence[str], moves: str, size: int) -> bool:
    """True when ``moves`` (``R,D``) lead from S to G: a step past the ``size`` x ``size`` border,
    onto H or off the rows, or an unknown move, fails; the walk must end on G. Without an S or a
    G nothing is reached (the last S and G count, as in the harness)."""
    start = goal = None
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell == "S":
                start = (r, c)
            elif cell == "G":
                goal = (r, c)
    if start is None or goal is None or not moves:
        return False
    row, column = start
    for move in moves.upper().replace(",", ""):
        if move not in _STEPS:
            return False
        row, column = row + _STEPS[move][0], column + _STEPS[move][1]
        if not (0 <= row < size and 0 <= column < size):
            return False
        if row >= len(rows) or column >= len(rows[row]) or rows[row][column] == "H":
            return False
    return (row, column) == goal


def vsp(response: str, maze_map: str, maze_size: int) -> Verdict:
    """A VSP response: its boxed moves walked on the maze."""
    moves = vsp_moves(response)
    if moves is None:
        return Verdict(False, None, "vsp:no-boxed-moves")
    return Verdict(walk_maze(maze_rows(maze_map), moves, maze_size), moves, "vsp:walked")


# ---------------------------------------------------------------------------------------------- ChartQA
def chartqa_prediction(response: str) -> tuple[str, str]:
    """(prediction, where): ``Round_0:``/``Round_1:`` become spaces; the first answer tag when
    both tags are there, else the whole response (the harness asks its judge there), stripped."""
    text = response
    for marker in ROUND_MARKERS:
        text = text.replace(marker, " ")
    tagged = first_answer_tag(text)
    return (tagged.strip(), "answer-tag") if tagged is not None else (text.strip(), "whole-response")


def harness_number(text: str) -> float | None:
    """``text`` as a number by Python's ``float`` (no thousands separators; ``1e3``, ``1_000`` and
    surrounding spaces accepted); a trailing ``%`` (any count) divides by 100. None otherwise."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(reference: str, other: str, tolerance: float = 0.05) -> bool:
    """Relaxed correctness relative to ``reference``: when ``other`` is a number and
    ``reference`` a non-zero number, ``|other - reference| / |reference| <= tolerance``; else
    the two strings equal case-insensitively (so a zero reference needs the same text)."""
    reference_value, other_value = harness_number(reference), harness_number(other)
    if other_value is not None and reference_value:
        return abs(other_value - reference_value) / abs(reference_value) <= tolerance
    return other.lower() == reference.lower()


def chartqa(response: str, golds: str | Iterable[str], gold_relative: bool = False) -> Verdict:
    """A ChartQA response: hit when it matches any gold. The harness measures the 5 % relative
    to the *prediction* (``|gold - pred| / |pred|``); ``gold_relative`` measures it relative to
    the gold instead (ChartQA's published definition), which is not the paper's figure."""
    golds = [golds] if isinstance(golds, str) else [str(gold) for gold in golds]
    prediction, where = chartqa_prediction(response)
    if gold_relative:
        hit = any(relaxed_match(gold, prediction) for gold in golds)
    else:
        hit = any(relaxed_match(prediction, gold) for gold in golds)
    form = "gold-relative" if gold_relative else "prediction-relative"
    return Verdict(hit, prediction, f"{where}:{form}")
