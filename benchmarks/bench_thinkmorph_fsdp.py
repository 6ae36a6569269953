"""OPSD optimizer steps of ThinkMorph on one or several GPUs: step time, its split, peak memory.

Builds the start model the way ``opsd run`` does (with several processes: rank 0 builds, every
rank receives its shards, the start model waits in host memory), clones the student and the EMA
teacher from the shards, and times ``Trainer.train_step`` on the ``thinkmorph-data`` task over
the synthetic dataset (written on the fly). No checkpoints, no evaluation: only the steps.
Launch one process per GPU:

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_thinkmorph_fsdp.py \
        --config examples/thinkmorph-8xh800.toml --set backend.flavour=7b-random --steps 3

Per step it prints the loss, the seconds spent drawing visual thoughts, sampling, in the
teacher and in the student (forward + backward; the rest of a step is clipping, AdamW and the
EMA update), completion tokens, and the peak GPU memory of the busiest rank; at the end the
medians over the steps after the first (the first pays for CUDA graph capture and allocator
warm-up) and, with ``--json``, all of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from opsd_core.components import build_components
from opsd_core.config.loader import load_config
from opsd_core.runtime import resolve_device
from opsd_core import runtime
from opsd_core.trainer import sharding
from opsd_core.trainer.trainer import Trainer
from opsd_core.rundir import MetricsLog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="examples/thinkmorph-8xh800.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, as opsd run --set")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data-side", type=int, default=512, help="image side of the synthetic dataset")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "opsd-bench-fsdp",
                        help="where the synthetic dataset is written (shared by the processes)")
    args = parser.parse_args()

    workdir = args.workdir
    overrides = list(args.overrides)
    if not any(item.startswith("task.root=") for item in overrides):
        overrides.append(f"task.root={workdir / 'data'}")
    config = load_config(args.config, overrides)
    device = resolve_device(config.run.device)
    with runtime.process_group(config, device) as ranks:
        data = Path(config.task.root)
        if ranks.is_main and not data.exists():
            from opsd_thinkmorph.demo_data import write_demo_dataset

            write_demo_dataset(data, rows_per_dataset=16, side=args.data_side, seed=0)
        ranks.barrier()
        components = build_components(config, world_size=ranks.world_size)
        backend = components.backend
        backend.check_run(config)
        started = time.perf_counter()
        start, skeleton = sharding.build_start(backend, config, ranks, device)
        if skeleton is None:
            student = start.requires_grad_(True)  # one process: train the start model itself
        else:
            parked = sharding.local_tensors(start)
            del start
            runtime.release_cached_memory(ranks.device)
            student = sharding.sharded_clone(parked, skeleton, backend, ranks, config).requires_grad_(True)
        trainer = Trainer(
            components, student, workdir / "phase", MetricsLog(workdir / "metrics.jsonl"), ranks=ranks, skeleton=skeleton
        )
        build_s = time.perf_counter() - started
        records = []
        for step in range(args.steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            metrics = trainer.train_step()
            metrics["step_s"] = time.perf_counter() - started
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            metrics["peak_gib"] = max(ranks.gather(peak))
            records.append(metrics)
            if ranks.is_main:
                shown = " ".join(
                    f"{key}={metrics[key]:.3f}"
                    for key in ("loss", "step_s", "visual_thought_s", "sample_s", "teacher_s", "student_s", "completion_tokens", "peak_gib")
                    if key in metrics
                )
                print(f"step {step + 1}: {shown}", flush=True)
        if ranks.is_main:
            steady = records[1:] or records
            samples = config.train.samples_per_step * config.train.grad_accum
            summary = {key: statistics.median(r[key] for r in steady) for key in steady[0]}
            summary["tokens_per_s"] = summary["completion_tokens"] * samples / summary["step_s"]
            summary["samples_per_s"] = samples / summary["step_s"]
            result = {
                "world_size": ranks.world_size,
                "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "flavour": getattr(config.backend, "flavour", None),
                "precision": config.run.precision,
                "samples_per_step": samples,
                "build_s": build_s,
                "steps": records,
                "median_after_first": summary,
            }
            print(json.dumps({"world_size": ranks.world_size, "build_s": round(build_s, 1), **{k: round(v, 3) for k, v in summary.items()}}))
            if args.json:
                args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
