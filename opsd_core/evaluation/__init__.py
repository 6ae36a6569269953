"""Greedy evaluation of a model in the student, teacher and noise-VT contexts."""

from opsd_core.evaluation.evaluate import EvalResult, contexts_for, evaluate, greedy_decode, greedy_sampler

__all__ = ["EvalResult", "contexts_for", "evaluate", "greedy_decode", "greedy_sampler"]
