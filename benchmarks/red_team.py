"""The red-team catalogue: bad input and injected faults against the real command line, each
case classified automatically, with a counts table and a JSON of every outcome.

Every case runs the ``opsd`` command line in a process of its own on a fresh temporary directory
(the embedded default with a shortened config: 4 optimizer steps, checkpoints at 2 and 4, the
noise control off, so a run takes seconds; a trained run is made once and copied where a case
needs one). A case says whether an error is due; the outcome is

- ``clear``: an error was due and came as a non-zero exit with one short ``Error:`` message, no
  traceback, every file that existed before unchanged and nothing left behind (or, where the
  case allows it, only the files of a run that had started); or no error was due and the
  command succeeded with the run directory describing what happened;
- ``traceback``: a traceback or a long dump instead of one line (or no answer within the time
  limit);
- ``unexpected``: one line, but the command line's line for an exception nobody raised on
  purpose ("unexpected TypeError ... full traceback in ..."), where the input deserved a message
  naming what is wrong with it;
- ``silent``: exit 0 where an error was due;
- ``data-loss``: a file the user had was changed or removed, a failed command left files
  behind, or the run directory misdescribes the run;
- ``refused``: no error was due, yet the command refused.

Each case's process is forked from one that imported torch and ``opsd_core`` once (the
import takes seconds; a case then costs what its command does) and runs ``opsd``'s entry point
with the case's arguments, working directory and environment, its stdout and stderr captured;
``--spawn`` starts ``python -m opsd_core`` afresh instead. Faults the operating system would
cause (a full disk, a read-only directory) and CUDA running out of memory are injected in that
process through an audit hook that raises at the first file operation matching a pattern.

Usage::

    nice python benchmarks/red_team.py [--json red_team.json] [-k SUBSTRING] [--timeout 180]

It runs the ``opsd_core`` that ``python`` imports (set ``PYTHONPATH`` to measure another
checkout). Takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path


from red_team_cases import (  # the catalogue, beside this script
    BASELINE_S,
    HOLDERS,
    INJECTOR,
    OUTCOMES,
    QUICKSTART,
    SHORT,
    UNEXPECTED,
    VOLATILE,
    Cache,
    Case,
    catalogue,
    opsd,
)


# ---------------------------------------------------------------------------------- running
def snapshot(w: Path) -> dict[str, bytes]:
    """What every file under ``w`` holds (a symlink: its target; a file over 1 MB: its sha256),
    by relative path; directories as ``path/``."""
    found = {}
    for path in sorted(w.rglob("*")):
        relative = str(path.relative_to(w))
        if path.is_symlink():
            found[relative] = b"->" + os.fsencode(os.readlink(path))
        elif path.is_file():
            data = path.read_bytes()
            found[relative] = data if len(data) <= 2**20 else hashlib.sha256(data).hexdigest().encode()
        elif path.is_dir():
            found[relative + "/"] = b"dir"
    return found


def changed_files(before: dict[str, bytes], after: dict[str, bytes], continuing: bool) -> list[str]:
    """Files of ``before`` that ``after`` removed or changed. With ``continuing`` (a run that
    went on), what a run adds to is not a change: a file that only grew at its end
    (metrics.jsonl), a results.json that keeps every earlier phase record, a config.toml that
    records an allowed change."""
    changed = []
    for path, old in before.items():
        new = after.get(path)
        if Path(path).name in VOLATILE or new == old:
            continue
        if continuing and new is not None and _continued(Path(path).name, old, new):
            continue
        changed.append(path)
    return sorted(changed)


def _continued(name: str, old: bytes, new: bytes) -> bool:
    if new.startswith(old):
        return True
    if name == "results.json":
        earlier, later = json.loads(old), json.loads(new)
        return all(later.get(key) == value for key, value in earlier.items() if key != "total_wall_s")
    return name == "config.toml" and new.startswith(b"# changed on resume")


def error_lines(stderr: str) -> list[str]:
    """stderr without click's usage lines and Python warnings."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return [
        line for line in lines
        if not line.startswith(("Usage:", "Try '")) and "Warning" not in line and not line.startswith("  warnings.warn")
    ]  # fmt: skip


def classify(case: Case, code: int | None, stderr: str, before: dict, after: dict, w: Path) -> tuple[str, str]:
    if code is None:
        return "traceback", "no answer within the time limit"
    changed = changed_files(before, after, case.allow_new)
    new = sorted(p for p in after if p not in before and not p.endswith("/"))
    lines = error_lines(stderr)
    problem = case.check(w) if case.check else None
    if case.error_due:
        if code == 0:
            return "silent", "exit 0"
        if "Traceback" in stderr:
            return "traceback", lines[-1] if lines else ""
        if len(lines) > 3 or not any(line.startswith("Error:") for line in lines):
            return "traceback", f"{len(lines)} lines: " + (lines[-1] if lines else "")
        if any(line.startswith(UNEXPECTED) for line in lines):
            return "unexpected", lines[-1]
        if changed:
            return "data-loss", f"changed {changed[:3]}"
        if new and not case.allow_new:
            return "data-loss", f"left {new[:3]}"
        if problem:
            return "data-loss", problem
        return "clear", lines[-1]
    if code != 0:
        if "Traceback" in stderr or len(lines) > 3:
            return "traceback", lines[-1] if lines else ""
        if any(line.startswith(UNEXPECTED) for line in lines):
            return "unexpected", lines[-1]
        return "refused", lines[-1] if lines else f"exit {code}"
    if problem:
        return "data-loss", problem
    return "clear", "succeeded"


SPAWN = [False]


def forked(arguments: list[str], w: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run ``opsd arguments`` in a child forked from this process (which imported torch and
    ``opsd_core``): (exit code or None on a timeout, stderr)."""
    out, err = w.parent / f"{w.name}.stdout", w.parent / f"{w.name}.stderr"
    pid = os.fork()
    if pid == 0:  # the child: the command line as `python -m opsd_core` would run it
        code = 1
        try:
            os.chdir(w)
            os.environ.clear()
            os.environ.update(env)
            for descriptor, path in ((1, out), (2, err)):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(handle, descriptor)
                os.close(handle)
            sys.stdin = open(os.devnull)
            exec(INJECTOR, {})
            sys.argv = ["opsd", *arguments]
            from opsd_core.cli import main as opsd_main

            try:
                opsd_main()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None, err.read_text(errors="replace")
        time.sleep(0.05)
    stderr = err.read_text(errors="replace")
    out.unlink(missing_ok=True)
    err.unlink(missing_ok=True)
    return os.waitstatus_to_exitcode(status), stderr


def run_case(case: Case, cache: Cache, injector: Path, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="opsd-red-team-") as folder:
        w = Path(folder)
        (w / "cfg.toml").write_bytes((cache.root / "cfg.toml").read_bytes().replace(b"@OUTPUT@", str(w / "runs").encode()))
        if case.setup:
            case.setup(w)
        before = snapshot(w)
        env = dict(os.environ)
        if case.fault:
            env["OPSD_RED_TEAM_FAULT"] = case.fault
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(injector), env.get("PYTHONPATH")]))
        started = time.perf_counter()
        try:
            if case.runner:
                code, stderr = case.runner(w, case, timeout)
            elif SPAWN[0] or case.spawn:
                done = subprocess.run(opsd(*case.argv(w)), capture_output=True, text=True, timeout=timeout, cwd=w, env=env)
                code, stderr = done.returncode, done.stderr
            else:
                code, stderr = forked(case.argv(w), w, env, timeout)
        except subprocess.TimeoutExpired:
            code, stderr = None, ""
        finally:
            while HOLDERS:
                holder = HOLDERS.pop()
                holder.kill()
                holder.wait()
        outcome, detail = classify(case, code, stderr, before, snapshot(w), w)
        return {"family": case.family, "case": case.name, "error_due": case.error_due, "outcome": outcome,
                "exit": code, "detail": detail[:400], "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def table(records: list[dict]) -> str:
    counts: dict[str, Counter] = defaultdict(Counter)
    for record in records:
        counts[record["family"]][record["outcome"]] += 1
    header = f"| {'family':<24} | cases | " + " | ".join(f"{o:>9}" for o in OUTCOMES) + " |"
    rows = [header, "|" + "---|" * (len(OUTCOMES) + 2)]
    total: Counter = Counter()
    for family, counter in counts.items():
        total.update(counter)
        rows.append(f"| {family:<24} | {sum(counter.values()):>5} | " + " | ".join(f"{counter[o]:>9}" for o in OUTCOMES) + " |")
    rows.append(f"| {'all':<24} | {sum(total.values()):>5} | " + " | ".join(f"{total[o]:>9}" for o in OUTCOMES) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("red_team.json"), help="where the per-case outcomes go")
    parser.add_argument("-k", dest="only", help="run only the cases whose family or name contains this")
    parser.add_argument("--timeout", type=float, default=180, help="seconds one case may take")
    parser.add_argument("--list", action="store_true", help="list the cases and stop")
    parser.add_argument("--spawn", action="store_true", help="start python afresh for every case (slower)")
    args = parser.parse_args()
    SPAWN[0] = args.spawn
    if not args.spawn:  # imported once here, inherited by every forked case
        import opsd_core.cli  # noqa: F401
        import opsd_core.experiment  # noqa: F401
    with tempfile.TemporaryDirectory(prefix="opsd-red-team-cache-") as folder:
        cache = Cache(Path(folder))
        from opsd_core.config import load_config, to_toml

        short = load_config(QUICKSTART, [f"{key}={value}" for key, value in SHORT.items()])
        (cache.root / "cfg.toml").write_text(to_toml(short).replace('output_dir = "runs"', 'output_dir = "@OUTPUT@"'))
        cases = catalogue(cache)
        if args.only:
            cases = [c for c in cases if args.only in c.family or args.only in c.name]
        if args.list:
            for case in cases:
                print(f"{case.family}: {case.name}")
            print(f"{len(cases)} cases")
            return
        injector = cache.root / "injector"
        injector.mkdir()
        (injector / "sitecustomize.py").write_text(INJECTOR)
        (cache.root / "cfg.toml").write_text((cache.root / "cfg.toml").read_text().replace("@OUTPUT@", str(cache.root / "unused")))
        started = time.perf_counter()
        cache.train()
        BASELINE_S[0] = time.perf_counter() - started
        (cache.root / "cfg.toml").write_text(to_toml(short).replace('output_dir = "runs"', 'output_dir = "@OUTPUT@"'))
        records = []
        for number, case in enumerate(cases, start=1):
            record = run_case(case, cache, injector, args.timeout)
            records.append(record)
            print(f"[{number:3d}/{len(cases)}] {record['outcome']:<9} {case.family}: {case.name} -- {record['detail'][:160]}", flush=True)
    print()
    print(table(records))
    args.json.write_text(json.dumps({"cases": records, "table": table(records)}, indent=1))
    print(f"\nper-case outcomes: {args.json}")


if __name__ == "__main__":
    main()
