"""The memory planner's estimate beside the measured peak: a few optimizer steps per config.

For every ``--case`` (a config path followed by its ``--set`` style overrides), the script asks
the planner for its per-GPU and per-host peak (``opsd plan``'s figures for one process), then
builds the run as ``opsd run`` does in one process (the start model on the device, a student
copy, the teacher, AdamW) and runs ``--steps`` optimizer steps of the OPSD phase, and prints the
planner's peak beside ``torch.cuda.max_memory_allocated`` (from before the start model is built
to the last step) and the process's peak resident host memory. The planner bounds every
sequence by its cap (``sampling.max_forward_tokens``); the table also gives its peak at the
longest student forward the steps reached, which separates the formulas' error from the caps'
slack. On a CPU the GPU column is
empty: the run still exercises every path, which is what a smoke test needs.

Usage::

    python benchmarks/bench_memory_plan.py                       # the embedded default and the thinkmorph debug flavour
    python benchmarks/bench_memory_plan.py --steps 3 \\
        --case "examples/thinkmorph-debug.toml backend.flavour='7b-random' run.device='cuda' \\
                run.precision='bf16' teacher.name='frozen' train.samples_per_step=1 \\
                sampling.max_completion_tokens=256"
    python benchmarks/bench_memory_plan.py --json plan.json      # the table as JSON too

A thinkmorph-data case whose ``task.root`` does not exist trains on the synthetic demo dataset
(``opsd_thinkmorph.demo_data``), written under ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from opsd_core import lora
from opsd_core.components import build_components
from opsd_core.config import load_config, lora_settings
from opsd_core.memory_census import run_plan
from opsd_core.memory_plan import GIB
from opsd_core.rundir import MetricsLog
from opsd_core.runtime import apply_threads, resolve_device
from opsd_core.trainer import trainable
from opsd_core.trainer.trainer import Trainer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEFAULT_CASES = (
    f"{EXAMPLES / 'quickstart.toml'} train.samples_per_step=8 sampling.max_completion_tokens=16",
    f"{EXAMPLES / 'thinkmorph-debug.toml'} train.samples_per_step=1 train.grad_accum=1 sampling.max_completion_tokens=8",
)


def case_config(case: str, workdir: Path):
    """The config of one case: its path and overrides, the run's files under ``workdir``."""
    path, *overrides = shlex.split(case)
    overrides.append(f"run.output_dir={json.dumps(str(workdir))}")
    config = load_config(path, overrides)
    if config.task.name == "thinkmorph-data" and not Path(config.task.root).exists():
        from opsd_thinkmorph.demo_data import write_demo_dataset

        root = write_demo_dataset(workdir / "thinkmorph-demo", rows_per_dataset=8, side=64, seed=0)
        config = load_config(path, (*overrides, f"task.root={json.dumps(str(root))}"))
    return config


class StudentLengths:
    """Wraps a backend's completion-row methods to record the longest student forward (context
    and completion positions, the calls made with gradients)."""

    def __init__(self, backend):
        self.longest = 0
        for name in ("completion_logits", "completion_hidden"):
            setattr(backend, name, self._recording(backend, getattr(backend, name)))

    def _recording(self, backend, method):
        def recorded(model, contexts, completions):
            if torch.is_grad_enabled():
                width = int(completions.tokens.shape[1])
                self.longest = max(self.longest, *(backend.context_length(c) + width for c in contexts))
            return method(model, contexts, completions)

        return recorded


def measure(case: str, steps: int, workdir: Path) -> dict:
    """The planner's peaks and the measured ones of ``steps`` optimizer steps of ``case``."""
    config = case_config(case, workdir)
    apply_threads(config.run.threads)
    device = resolve_device(config.run.device)
    components = build_components(config)
    fused = components.divergence.uses_hidden_states
    planned, census = run_plan(config, components.backend, fused, 1, None, None)
    lengths = StudentLengths(components.backend)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    start = components.backend.build_model().to(device).requires_grad_(False)
    # The student as `opsd run` builds it in one process: adapters over the shared frozen start
    # (LoRA), or a copy sharing the start's frozen tensors (the backend's trainable set).
    if lora_settings(config) is not None:
        student = lora.base_sharing_copy(start)
    else:
        student = trainable.student_from_start(components.backend, start)
    trainer = Trainer(components, student, workdir / "phase", MetricsLog(workdir / "metrics.jsonl"))
    step_metrics = [trainer.train_step() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # The configured caps bound every sequence; the same plan at the lengths the steps reached
    # isolates the formulas from that slack.
    at_length = config.model_copy(
        update={"sampling": config.sampling.model_copy(update={"max_forward_tokens": max(lengths.longest, 2)})}
    )
    observed, _ = run_plan(at_length, components.backend, fused, 1, None, None)
    record = {
        "case": case,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters": census.total,
        "planned_gpu_bytes": planned.estimate.gpu_peak,
        "planned_stage": planned.estimate.peak_stage,
        "student_positions": lengths.longest,
        "planned_at_length_gpu_bytes": observed.estimate.gpu_peak,
        "measured_gpu_bytes": measured,
        "ratio": planned.estimate.gpu_peak / measured if measured else None,
        "ratio_at_length": observed.estimate.gpu_peak / measured if measured else None,
        "planned_host_bytes": planned.estimate.host_peak,
        "host_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": time.perf_counter() - started,
        # The last step's split (the first compiles and warms up).
        "last_step_s": {key: round(value, 2) for key, value in step_metrics[-1].items() if key.endswith("_s")},
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
    }
    del trainer, student, start, components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def isolated(case: str, steps: int, workdir: Path) -> dict:
    """``measure`` in a child process; a case that fails (out of memory, say) gives a record
    holding the planner's figures and the failure's last line."""
    workdir.mkdir(parents=True, exist_ok=True)
    output = workdir / "record.json"
    command = [sys.executable, __file__, "--case", case, "--steps", str(steps), "--workdir", str(workdir), "--json", str(output)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode == 0:
        return json.loads(output.read_text())[0]
    config = case_config(case, workdir)
    components = build_components(config)
    planned, census = run_plan(config, components.backend, components.divergence.uses_hidden_states, 1, None, None)
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    return {
        "case": case,
        "device": "failed",
        "parameters": census.total,
        "planned_gpu_bytes": planned.estimate.gpu_peak,
        "planned_stage": planned.estimate.peak_stage,
        "student_positions": 0,
        "planned_at_length_gpu_bytes": None,
        "measured_gpu_bytes": None,
        "ratio": None,
        "ratio_at_length": None,
        "planned_host_bytes": planned.estimate.host_peak,
        "host_max_rss_bytes": None,
        "error": lines[-1] if lines else f"exit status {finished.returncode}",
    }


def table(records: list[dict]) -> str:
    """A markdown table of the records."""

    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GIB:.2f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "| case | device | parameters | planned GPU peak GiB at the caps (stage) | student positions reached "
        "| planned GPU peak GiB at them | measured GPU peak GiB | planned / measured (caps, reached) "
        "| planned host GiB | host max RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| `{r['case']}` | {r['device']} | {r['parameters']:,} | {gib(r['planned_gpu_bytes'])} ({r['planned_stage']}) "
            f"| {r['student_positions']} | {gib(r['planned_at_length_gpu_bytes'])} | {gib(r['measured_gpu_bytes'])} "
            f"| {ratio(r['ratio'])}, {ratio(r['ratio_at_length'])} | {gib(r['planned_host_bytes'])} "
            f"| {gib(r['host_max_rss_bytes'])} |"
        )
        if "error" in r:
            lines[-1] += f" failed: {r['error'][:300]}"
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--case",
        action="append",
        dest="cases",
        metavar="'CONFIG [SECTION.FIELD=VALUE ...]'",
        help="A config and its overrides, quoted as one argument; repeatable (default: the embedded default "
        "and the thinkmorph debug flavour).",
    )
    parser.add_argument("--steps", type=int, default=2, help="Optimizer steps per case (AdamW state exists from the first).")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "opsd-bench-memory-plan")
    parser.add_argument("--json", type=Path, default=None, help="Also write the records here.")
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    cases = args.cases or DEFAULT_CASES
    if len(cases) == 1:
        records = [measure(cases[0], args.steps, args.workdir)]
    else:  # one process per case: nothing a case leaves allocated (caches, graphs) counts in the next
        records = [isolated(case, args.steps, args.workdir / f"case-{number}") for number, case in enumerate(cases)]
    for record in records:
        print(json.dumps(record), flush=True)
    print(table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
