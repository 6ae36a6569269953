"""Miniature benchmark files, for plugins' tests of ``opsd eval --benchmarks``.

Owns: the list of names: :func:`write_miniature_benchmarks` writes a few synthetic questions of
every benchmark of the paper, in the released VLMEvalKit TSV formats, under one data root (pass
it as ``--data-root``); :func:`write_miniature_parquet` writes the same questions as the Hugging
Face parquet releases; :data:`BLINK_SUBTASKS` are the BLINK subtasks both write.
Does not know: what a model answers; the content is meaningless, the format is the point.
"""

from opsd_core.evaluation.miniature import BLINK_SUBTASKS, write_miniature_benchmarks, write_miniature_parquet

__all__ = ["BLINK_SUBTASKS", "write_miniature_benchmarks", "write_miniature_parquet"]
