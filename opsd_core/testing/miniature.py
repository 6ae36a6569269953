"""Miniature benchmark files, for plugins' tests of ``opsd eval --benchmarks``.

Owns: the list of names: :func:`write_miniature_benchmarks` writes a few synthetic questions of
every benchmark, in the released files' formats, under one data root (pass it as
``--data-root``).
Does not know: what a model answers; the content is meaningless, the format is the point.
"""

from opsd_core.evaluation.miniature import write_miniature_benchmarks

__all__ = ["write_miniature_benchmarks"]
