"""`opsd run examples/thinkmorph.toml` on one GPU, end to end, with a checkpoint and a resume.

The one-GPU configuration (LoRA adapters on the understanding expert, the frozen base shared,
activation checkpointing, micro-batches of 2, 16 samples per optimizer step) on the full-size
architecture with random weights (``backend.flavour = '7b-random'``) and the synthetic
ThinkMorph dataset (``opsd_thinkmorph.demo_data``, ``--side`` pixels a side): ``--steps``
optimizer steps of the OPSD phase (sampling with the student, the EMA teacher in the context
that holds the visual thought, the loss, AdamW, the teacher update), a checkpoint at step
``--steps - 1``; then the last step's checkpoint and the phase's result are removed and the run
is resumed, and the resumed last step's loss must equal the first run's. Prints the wall time,
the step split (sampling / teacher / student / rest) and peak GPU memory from metrics.jsonl, the
process's peak host memory, and the memory planner's estimate of the same run.

Usage (one H100 runs the defaults in about 5 minutes)::

    python benchmarks/bench_one_gpu_run.py --workdir /tmp/one-gpu [--steps 3] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "thinkmorph.toml"


def opsd(*arguments: str) -> float:
    """Run the CLI; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "opsd_core", *arguments], check=True)
    return time.perf_counter() - started


def step_lines(run: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {line["step"]: line for line in lines if line.get("phase") == "opsd" and "loss" in line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256, help="sampling.max_completion_tokens")
    parser.add_argument("--side", type=int, default=512, help="pixels a side of the demo images and VTs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    args = parser.parse_args()
    from opsd_thinkmorph.demo_data import write_demo_dataset

    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (a checkpoint before the last step)")
    shutil.rmtree(args.workdir, ignore_errors=True)
    data = write_demo_dataset(args.workdir / "data", rows_per_dataset=16, side=args.side)
    settings = [
        "backend.flavour='7b-random'", f"task.root='{data}'", f"run.output_dir='{args.workdir}'",
        "run.name='one-gpu'", f"schedule.total_steps={args.steps}", "schedule.warmup_steps=1",
        f"train.checkpoint_every={args.steps - 1}", "train.keep_checkpoints=2",
        f"sampling.max_completion_tokens={args.tokens}", "task.eval_fraction=0.1", "eval.limit=4", "eval.batch_size=4",
        "diagnostics.kl_samples=4", "diagnostics.batch_size=4", "logging.media_problems=0",
        *args.overrides,
    ]  # fmt: skip
    flags = [part for setting in settings for part in ("--set", setting)]
    plan = subprocess.run(
        [sys.executable, "-m", "opsd_core", "plan", str(EXAMPLE), *flags], capture_output=True, text=True, check=True
    ).stdout
    first_s = opsd("run", str(EXAMPLE), "--no-progress", *flags)
    run = args.workdir / "one-gpu"
    first = step_lines(run)
    # Back to the checkpoint before the last step: the phase resumes there.
    last = run / "opsd" / "checkpoints" / f"step-{args.steps:07d}"
    shutil.rmtree(last)
    results = json.loads((run / "results.json").read_text())
    results.pop("opsd")
    (run / "results.json").write_text(json.dumps(results))
    resume_s = opsd("run", "--resume", str(run), "--no-progress")
    resumed = step_lines(run)
    steady = [first[step] for step in sorted(first) if step > 1] or list(first.values())
    split = {
        key: round(sum(line[key] for line in steady) / len(steady), 2)
        for key in ("sample_s", "visual_thought_s", "teacher_s", "student_s", "step_s")
        if key in steady[0]
    }
    summary = {
        "first_run_s": round(first_s, 1),
        "resume_run_s": round(resume_s, 1),
        "step_split_s": split,
        "peak_gpu_gb": max(line.get("peak_memory_gb", 0.0) for line in first.values()),
        "peak_host_gb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 1),
        "last_step_loss": first[args.steps]["loss"],
        "resumed_last_step_loss": resumed[args.steps]["loss"],
        "resume_exact": first[args.steps]["loss"] == resumed[args.steps]["loss"],
        "plan_peak": [line.strip() for line in plan.splitlines() if line.strip().startswith(("peak", "fits"))],
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
