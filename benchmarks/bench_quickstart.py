"""Where the embedded default's time goes: `opsd run` with no config, timed phase by phase.

Runs the quickstart (``examples/quickstart.toml``) in a fresh directory as a user does and
prints, from the run's own records: the whole wall time (start-up included), the start
checkpoint's diagnosis (KL diagnostic and three-context evaluation), and for each training
phase its training time split per optimizer step into sampling, teacher forward, student
forward + backward + loss, and the rest (optimizer, teacher update, bookkeeping), its
evaluation, and what remains (the phase's KL diagnostics, media, checkpoints, report and
plots). Then the run's figures: accuracies, KL and gap closure with their standard errors, so
a faster setting is checked against the effects it must keep.

Usage::

    python benchmarks/bench_quickstart.py [--threads N] [--seed S] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPLIT = ("sample_s", "teacher_s", "student_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, help="run.threads (default: the config's)")
    parser.add_argument("--seed", type=int, default=0, help="run.seed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        settings = [f"run.output_dir='{workdir}'", f"run.seed={args.seed}", *args.overrides]
        if args.threads:
            settings.append(f"run.threads={args.threads}")
        started = time.perf_counter()
        command = [sys.executable, "-m", "opsd_core", "run", "--no-progress"]
        subprocess.run([*command, *[part for s in settings for part in ("--set", s)]], check=True, stdout=subprocess.DEVNULL)
        total = time.perf_counter() - started
        run = Path(workdir) / "quickstart"
        results = json.loads((run / "results.json").read_text())
        config = (run / "config.toml").read_text()
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = next(int(line.split("=")[1]) for line in config.splitlines() if line.startswith("total_steps"))
    rows = [("start checkpoint: KL diagnostic + evaluation", results["start"]["wall_s"])]
    accounted = results["start"]["wall_s"]
    for phase, record in results.items():
        if phase == "start" or not isinstance(record, dict) or "train_s" not in record:
            continue
        logged = [line for line in lines if line.get("phase") == phase and "step_s" in line]
        per_step = {key: statistics.mean(line[key] for line in logged) for key in (*SPLIT, "step_s")}
        rows.append((f"{phase}: training ({steps} steps)", record["train_s"]))
        for key in SPLIT:
            rows.append((f"  {key[:-2]} (per step {per_step[key] * 1000:.0f} ms)", per_step[key] * steps))
        rest = per_step["step_s"] - sum(per_step[key] for key in SPLIT)
        rows.append((f"  rest of the step (per step {rest * 1000:.0f} ms)", rest * steps))
        rows.append((f"{phase}: evaluation", record["eval_s"]))
        accounted += record["train_s"] + record["eval_s"]
    rows.append(("start-up, KL diagnostics of the phases, media, checkpoints, report", total - accounted))
    rows.append(("total", total))
    width = max(len(name) for name, _ in rows)
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:7.1f} s")
    start = results["start"]
    print(f"\nstart: student {start['eval']['student']['accuracy']:.1%}, teacher context "
          f"{start['eval']['teacher']['accuracy']:.1%}, KL {start['kl']:.3f} ± {start['kl_se']:.3f} "
          f"(noise VT: {start['kl_noise']:.3f} ± {start['kl_noise_se']:.3f})")
    for phase, record in results.items():
        if phase != "start" and isinstance(record, dict) and "eval" in record:
            gain = record["eval"]["student"]["accuracy"] - start["eval"]["student"]["accuracy"]
            print(f"{phase}: student {record['eval']['student']['accuracy']:.1%} ({gain * 100:+.1f} points), "
                  f"teacher context {record['eval']['teacher']['accuracy']:.1%}, KL to the start teacher "
                  f"{record['kl_t0']:.3f} ± {record['kl_t0_se']:.3f}, gap closure {record['gap_closure']:.1%} "
                  f"± {record['gap_closure_se']:.1%}")


if __name__ == "__main__":
    main()
