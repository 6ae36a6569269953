"""The public answer-extraction and scoring helpers a task's ``score`` may use.

Owns: the list of names: reading the answer out of free model text (an ``<answer>`` tag, a
``\\boxed{}`` answer, an option letter or option text) and ChartQA's relaxed numeric match,
with the rules of the paper's evaluation harness so that figures are comparable. They keep
their meaning and signatures within a minor version, like :mod:`opsd_core.api`.
Does not know: benchmarks' files or models; every function is pure. Importing this module
currently imports torch (through the evaluation package), so import it from a task's
``task.py``, not from ``plugin.py`` or ``config.py``.
"""

from opsd_core.evaluation.answers import answer_tag, boxed, extract_choice, infer_option
from opsd_core.evaluation.scorers import relaxed_correct

__all__ = ["answer_tag", "boxed", "extract_choice", "infer_option", "relaxed_correct"]
