"""Lenient answer extraction from free model text, for tasks: answer tags, boxed answers,
option letters and option texts.

Owns: the rules (documented per function) by which a task turns a raw response into the answer
it compares: the last ``<answer>`` tag in any letter case, the last balanced ``\\boxed{}``, and
the option letter and option text rules of the paper's harness.
Does not know: benchmarks' files or models, nor the harness-exact benchmark rules
(:mod:`opsd_core.evaluation.rules`); every function is pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPTION_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def answer_tag(text: str) -> str | None:
    """The stripped content of the last ``<answer>...</answer>`` (case-insensitive), or None."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}``, with nested braces balanced, or None when
    there is none or it is not closed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, index = 1, start + len("\\boxed{")
    content_start = index
    while index < len(text):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[content_start:index].strip()
        index += 1
    return None


def infer_option_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter ``prediction`` names, by the harness's rule.

    Punctuation ``.()[],:;!*#{}`` becomes spaces and the text is split on whitespace. Exactly
    one distinct option letter must appear as a standalone token, and its first occurrence must
    be among the last four tokens (so "A" used as an article early in a sentence is not read as
    an answer). Otherwise None.
    """
    tokens = prediction.translate(_OPTION_PUNCTUATION).split()
    letters = {token for token in tokens if token in options}
    if len(letters) != 1:
        return None
    (letter,) = letters
    return letter if tokens.index(letter) >= len(tokens) - 4 else None


def infer_option_text(prediction: str, options: Mapping[str, str]) -> str | None:
    """The letter whose option text occurs in ``prediction`` (case-insensitive), when exactly
    one does and the prediction is at most twice as long as all option texts together."""
    if len(prediction) > 2 * sum(len(str(text)) for text in options.values()):
        return None
    lowered = prediction.lower()
    hits = [letter for letter, text in options.items() if str(text).strip() and str(text).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def infer_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """Letter first, then option text, on one string."""
    return infer_option_letter(prediction, options) or infer_option_text(prediction, options)


def extract_choice(response: str, options: Mapping[str, str]) -> str | None:
    """The option letter of a multiple-choice response, or None (counted wrong).

    Order: the whole response; then the content of its last ``<answer>`` tag; then the content
    of its last ``\\boxed{}``. The harness's optional LLM judge is not used.
    """
    for candidate in (response, answer_tag(response), boxed(response)):
        if candidate:
            letter = infer_option(candidate, options)
            if letter is not None:
                return letter
    return None
