"""Hook implementations of the benchmarks plugin: the nine tasks of the paper's evaluation.

Owns: the registry names, their params model and one-line descriptions.
Does not know: how a benchmark is read or scored (``opsd_benchmarks.tasks``); factories are
``"module:attr"`` strings resolved on first use, so ``opsd list`` stays light.
"""

from opsd_core.api import hookimpl

from opsd_benchmarks.config import BenchmarkParams

# Registry name -> (task class in opsd_benchmarks.tasks, description), in the paper's table order.
BENCHMARKS = {
    "vsp": ("VspTask", "VSP maze navigation: boxed moves walked on the maze (VSP_maze_task_main_original.tsv)."),
    "vispuzzle": ("VisPuzzleTask", "VisPuzzle multiple choice (VisPuzzle.tsv)."),
    "blink-jigsaw": ("BlinkJigsawTask", "BLINK's Jigsaw subtask, multiple choice (BLINK_Jigsaw.tsv or BLINK/Jigsaw parquet)."),
    "sat": ("SatTask", "SAT, circular: a question counts when every option rotation is right (SAT_circular.tsv)."),
    "blink": ("BlinkTask", "BLINK's fourteen subtasks, with per-category accuracy (BLINK.tsv or BLINK parquet)."),
    "chartqa": ("ChartQaTask", "ChartQA bar charts, relaxed accuracy per file (ChartQA_h_bar.tsv, ChartQA_v_bar.tsv)."),
    "vstar": ("VStarTask", "V* visual search, multiple choice (VStarBench.tsv or vstar-bench parquet)."),
    "mmvp": ("MmvpTask", "MMVP multiple choice, with pair accuracy (MMVP.tsv or MMVP parquet)."),
    "cv-bench": ("CvBenchTask", "CV-Bench: 2D as the mean over sources, 3D plain, averaged (CV-Bench-2D/3D.tsv)."),
}


@hookimpl
def register_tasks(registry):
    for name, (attribute, description) in BENCHMARKS.items():
        registry.add(name, f"opsd_benchmarks.tasks:{attribute}", BenchmarkParams, description=description)
