"""The red-team catalogue's cases: each bad input or injected fault, the short config and the
trained run they start from, and the helpers that write their inputs; run and classified by
``red_team.py`` (see its docstring). Not a script of its own."""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.toml"
SHORT = {
    "schedule.total_steps": "4",
    "schedule.warmup_steps": "1",
    "train.samples_per_step": "2",
    "train.checkpoint_every": "2",
    "train.keep_checkpoints": "2",
    "train.log_every": "1",
    "eval.limit": "4",
    "eval.batch_size": "4",
    "diagnostics.kl_samples": "2",
    "run.threads": "1",
    "experiment.noise_control": "false",
    "logging.media_problems": "0",
}
OUTCOMES = ("clear", "traceback", "unexpected", "silent", "data-loss", "refused")
# The command line's line for an exception nobody raised on purpose (it admits a likely bug).
UNEXPECTED = "Error: unexpected "
# Files a command may rewrite without changing anything the user had: the lock's holder note.
VOLATILE = {".lock"}

INJECTOR = '''
import errno, fnmatch, os, sys
_spec = os.environ.get("OPSD_RED_TEAM_FAULT")
if _spec:
    _event, _pattern, _kind = _spec.split("|")
    _fired = []

    def _writes(args):
        mode, flags = (args[1], args[2]) if len(args) > 2 else (args[1], 0)
        if isinstance(mode, str):
            return any(c in mode for c in "wax+")
        return bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    def _hook(event, args):
        if event != _event or _fired or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.fsdecode(args[0])
        if not fnmatch.fnmatch(path, _pattern) or (event == "open" and not _writes(args)):
            return
        _fired.append(path)
        if _kind == "oom":
            import torch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        code = getattr(errno, _kind)
        raise OSError(code, os.strerror(code), path)

    sys.addaudithook(_hook)
'''


@dataclass
class Case:
    """One bad input or fault.

    Attributes:
        family: what kind of fault (a row of the table).
        name: what the case does.
        argv: the ``opsd`` arguments, given the case's directory.
        setup: prepares the directory (the short config ``cfg.toml`` is always there).
        error_due: whether the command must refuse.
        allow_new: files the command may leave (a run that started and then stopped).
        check: for a command that should succeed or that started a run: a problem with the
            run directory afterwards, or None.
        fault: an injected fault, ``event|glob|errno-name or oom``.
        runner: replaces the single command (kills, concurrent writers); returns (exit code,
            stderr).
    """

    family: str
    name: str
    argv: Callable[[Path], list[str]]
    setup: Callable[[Path], object] | None = None
    error_due: bool = True
    allow_new: bool = False
    check: Callable[[Path], str | None] | None = None
    fault: str | None = None
    runner: Callable[[Path, Case, float], tuple[int, str]] | None = None
    spawn: bool = False



# --------------------------------------------------------------------------------------- helpers
def opsd(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "opsd_core", *arguments]


def run_dir(w: Path) -> Path:
    return w / "runs" / "quickstart"


def sets(pairs: dict[str, str]) -> list[str]:
    return [part for key, value in pairs.items() for part in ("--set", f"{key}={value}")]


def short_run(*extra: str) -> Callable[[Path], list[str]]:
    """``opsd run cfg.toml`` with extra arguments."""
    return lambda w: ["run", str(w / "cfg.toml"), "--no-progress", *extra]


def bad_value(field_name: str, value: str, family: str = "config value", error_due: bool = True) -> Case:
    return Case(family, f"{field_name}={value}", short_run("--set", f"{field_name}={value}"), error_due=error_due)


def resume(*extra: str) -> Callable[[Path], list[str]]:
    return lambda w: ["run", "--resume", str(run_dir(w)), "--no-progress", *extra]


def write(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = w / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def steps(*functions: Callable[[Path], object]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        for function in functions:
            function(w)

    return setup


class Cache:
    """A finished short run, trained once; unfinished copies are cut back to step 2."""

    def __init__(self, root: Path):
        self.root = root

    def train(self) -> None:
        output = self.root / "trained"
        subprocess.run(
            opsd("run", str(self.root / "cfg.toml"), "--no-progress", "--set", f"run.output_dir={json.dumps(str(output))}"),
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        self.finished_dir = output / "quickstart"

    def finished(self, w: Path) -> None:
        shutil.copytree(self.finished_dir, run_dir(w), symlinks=True)
        config = run_dir(w) / "config.toml"
        config.write_text(config.read_text().replace(str(self.finished_dir.parent), str(w / "runs")))

    def unfinished(self, w: Path) -> None:
        """The run as a kill after the step-2 checkpoint leaves it."""
        self.finished(w)
        directory = run_dir(w)
        shutil.rmtree(directory / "opsd" / "checkpoints" / "step-0000004")
        results = json.loads((directory / "results.json").read_text())
        (directory / "results.json").write_text(json.dumps({"start": results["start"]}, indent=2))
        lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
        kept = [r for r in lines if r.get("phase") != "opsd" or r.get("step", 0) <= 2]
        (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
        for name in ("report.md", "kl.png", "accuracy.png", "loss.png"):
            (directory / name).unlink(missing_ok=True)


def step_dir(w: Path, step: int = 2) -> Path:
    return run_dir(w) / "opsd" / "checkpoints" / f"step-{step:07d}"


def edit(path_of: Callable[[Path], Path], change: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = path_of(w)
        path.write_bytes(change(path.read_bytes()))

    return setup


def edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = step_dir(w) / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))

    return setup


def metrics_each_step_once(w: Path) -> str | None:
    directory = run_dir(w)
    if not (directory / "results.json").is_file():
        return "no results.json"
    results = json.loads((directory / "results.json").read_text())
    if "opsd" not in results:
        return "results.json lacks the opsd phase"
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    seen = Counter((r.get("phase"), r.get("step")) for r in records if r.get("phase") == "opsd" and "loss" in r)
    repeated = [key for key, count in seen.items() if count > 1]
    if repeated:
        return f"metrics.jsonl repeats {repeated}"
    if sorted(step for _phase, step in seen) != [1, 2, 3, 4]:
        return f"metrics.jsonl holds opsd steps {sorted(step for _phase, step in seen)}, not 1-4"
    return None


def config_shows(key: str, value: str) -> Callable[[Path], str | None]:
    section, name = key.split(".")

    def check(w: Path) -> str | None:
        import tomllib

        saved = tomllib.loads((run_dir(w) / "config.toml").read_text())
        if str(saved.get(section, {}).get(name)) != value:
            return f"config.toml shows {key} = {saved.get(section, {}).get(name)!r}, the run used {value}"
        return None

    return check


def checkpoint_kept(step: int) -> Callable[[Path], str | None]:
    def check(w: Path) -> str | None:
        leftovers = [p.name for p in (run_dir(w) / "opsd" / "checkpoints").iterdir() if p.name.startswith(".tmp")]
        if not (step_dir(w, step) / "manifest.json").is_file():
            return f"checkpoint step {step} is gone"
        return f"left {leftovers}" if leftovers else None

    return check


def hold_lock(w: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock (as a running ``opsd run`` does)."""
    code = (
        "import fcntl,sys,time;h=open(sys.argv[1],'a+');fcntl.flock(h,fcntl.LOCK_EX);"
        "h.seek(0);h.truncate();h.write('pid 4242 on elsewhere');h.flush();print('held',flush=True);time.sleep(300)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir(w) / ".lock")], stdout=subprocess.PIPE, text=True)
    holder.stdout.readline()
    return holder


def concurrent_new_runs(w: Path, case: Case, timeout: float) -> tuple[int, str]:
    """Two ``opsd run`` of one new run directory started together: one must be refused."""
    argv = opsd(*short_run()(w))
    first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=w)
    second = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=w)
    outcomes = [(process.wait(timeout), process.stderr.read()) for process in (first, second)]
    failed = [outcome for outcome in outcomes if outcome[0] != 0]
    return failed[0] if failed else (0, "")


def killed_then_resumed(fraction: float) -> Callable[[Path, Case, float], tuple[int, str]]:
    def runner(w: Path, case: Case, timeout: float) -> tuple[int, str]:
        process = subprocess.Popen(opsd(*short_run()(w)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=w)
        time.sleep(fraction * BASELINE_S[0])
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not (run_dir(w) / "config.toml").is_file():  # killed before it wrote anything: start again
            done = subprocess.run(opsd(*short_run()(w)), capture_output=True, text=True, timeout=timeout, cwd=w)
        else:
            done = subprocess.run(opsd(*resume()(w)), capture_output=True, text=True, timeout=timeout, cwd=w)
        return done.returncode, done.stderr

    return runner


def interrupted_then_resumed(w: Path, case: Case, timeout: float) -> tuple[int, str]:
    process = subprocess.Popen(opsd(*short_run()(w)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=w, text=True)
    time.sleep(0.5 * BASELINE_S[0])
    process.send_signal(signal.SIGINT)
    process.wait(timeout)
    stderr = process.stderr.read()
    if "Traceback" in stderr:
        return 1, stderr
    again = resume()(w) if (run_dir(w) / "config.toml").is_file() else short_run()(w)  # stopped before it wrote anything
    done = subprocess.run(opsd(*again), capture_output=True, text=True, timeout=timeout, cwd=w)
    return done.returncode, done.stderr


BASELINE_S = [8.0]  # the short run's wall time, measured when the cache is trained


# ------------------------------------------------------------------------------ benchmark data
def benchmark_root(w: Path) -> Path:
    from opsd_core.evaluation.miniature import write_miniature_benchmarks

    return write_miniature_benchmarks(w / "bench", per_benchmark=2)


def predictions(lines: list[str]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        benchmark_root(w)
        (w / "predictions.jsonl").write_text("".join(line + "\n" for line in lines))

    return setup


GOOD_PREDICTION = json.dumps({"benchmark": "vispuzzle", "index": 0, "response": "A"})


def rescore(*extra: str) -> Callable[[Path], list[str]]:
    return lambda w: [
        "eval", "--benchmarks", "vispuzzle", "--data-root", str(w / "bench"), "--predictions", str(w / "predictions.jsonl"),
        "--out", str(w / "rescored"), *extra,
    ]  # fmt: skip


def bad_tsv(change: Callable[[list[list[str]]], None]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        root = benchmark_root(w)
        (w / "predictions.jsonl").write_text(GOOD_PREDICTION + "\n")
        path = root / "VisPuzzle.tsv"
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t"))
        change(rows)
        with open(path, "w", newline="") as handle:
            csv.writer(handle, delimiter="\t").writerows(rows)

    return setup


def tsv_bytes(content: bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        root = benchmark_root(w)
        (w / "predictions.jsonl").write_text(GOOD_PREDICTION + "\n")
        (root / "VisPuzzle.tsv").write_bytes(content)

    return setup


def set_cell(row: int, column: str, value: str) -> Callable[[list[list[str]]], None]:
    def change(rows: list[list[str]]) -> None:
        rows[row][rows[0].index(column)] = value

    return change


# ----------------------------------------------------------------------------------- the cases
def catalogue(cache: Cache) -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    finished, unfinished = cache.finished, cache.unfinished

    # Config values of every field type: strings, paths, integers, floats, lists, booleans, names.
    for key, value in [
        ("run.seed", "-1"), ("run.seed", str(2**64)), ("run.seed", "1.5"), ("run.seed", '"zero"'), ("run.seed", "true"),
        ("run.device", '"tpu"'), ("run.device", '"cuda:7"'), ("run.device", '""'), ("run.precision", '"fp16"'),
        ("run.threads", "0"), ("run.threads", "-1"), ("run.threads", "100000"),
        ("optim.lr", "inf"), ("optim.lr", "nan"), ("optim.lr", "0"), ("optim.lr", "-1e-3"), ("optim.lr", '"fast"'),
        ("optim.betas", "[0.9]"), ("optim.betas", "[1.5, 0.9]"), ("optim.betas", "[0.9, 0.99, 0.5]"),
        ("optim.betas", "[nan, 0.9]"), ("optim.eps", "0"), ("optim.eps", "nan"), ("optim.weight_decay", "-1"),
        ("optim.weight_decay", "inf"), ("optim.grad_clip", "0"), ("optim.grad_clip", "nan"),
        ("schedule.total_steps", "0"), ("schedule.total_steps", str(2**70)), ("schedule.total_steps", "-5"),
        ("schedule.total_steps", "4.5"), ("schedule.warmup_steps", "-1"), ("schedule.min_lr", "1.0"),
        ("schedule.min_lr", "nan"), ("schedule.min_lr", "-1e-4"),
        ("train.samples_per_step", "0"), ("train.samples_per_step", str(10**12)), ("train.grad_accum", "0"),
        ("train.checkpoint_every", "-1"), ("train.keep_checkpoints", "0"),
        ("train.log_every", "0"), ("train.on_non_finite", '"ignore"'), ("train.replicate", "0"),
        ("sampling.temperature", "0"), ("sampling.temperature", "nan"), ("sampling.temperature", "inf"),
        ("sampling.max_completion_tokens", "0"), ("sampling.max_completion_tokens", str(10**9)),
        ("sampling.max_forward_tokens", "0"), ("sampling.visual_thoughts", '"maybe"'),
        ("divergence.name", '"kld"'), ("divergence.beta", "2"), ("divergence.beta", "nan"), ("divergence.top_k", "0"),
        ("divergence.clip", "-1"), ("divergence.clip_mode", '"foo"'),
        ("divergence.temperature", "0"), ("teacher.name", '"oracle"'), ("teacher.decay", "1.5"),
        ("teacher.decay", "nan"), ("backend.name", '"nope"'), ("backend.colour", "1"), ("task.name", '"nope"'),
        ("eval.limit", "0"), ("eval.batch_size", "0"), ("diagnostics.kl_samples", "0"),
        ("diagnostics.kl_samples", str(10**8)), ("diagnostics.batch_size", "0"), ("logging.loggers", '["nope"]'),
        ("logging.media_every", "-1"), ("logging.media_problems", "-1"), ("run.colour", '"red"'), ("colour.x", "1"),
        ("experiment.opsd", '"yes"'), ("optim.betas", "{a = 1}"), ("run.name", "[1, 2]"),
    ]:  # fmt: skip
        add(bad_value(key, value))
    # Valid by their documentation: K beyond the vocabulary is the whole vocabulary; micro-batches
    # need not divide anything.
    add(bad_value("divergence.top_k", str(10**9), error_due=False))
    add(bad_value("train.grad_accum", "3", error_due=False))

    # --set syntax.
    for override in ["run.seed", "=3", "run.seed=", "nosection=1", "run.seed=[1", "run.seed.deep.er=1", "run..seed=1"]:
        add(Case("override syntax", f"--set {override!r}", short_run("--set", override)))

    # The config file itself.
    add(Case("config file", "missing file", lambda w: ["run", str(w / "nope.toml")]))
    add(Case("config file", "a directory", lambda w: ["run", str(w)]))
    add(Case("config file", "not UTF-8", lambda w: ["run", str(w / "bad.toml")], write("bad.toml", b"[run]\nname = '\xff\xfe'\n")))
    add(Case("config file", "TOML syntax error", lambda w: ["run", str(w / "bad.toml")], write("bad.toml", "[run\nname=1\n")))
    add(Case("config file", "binary garbage", lambda w: ["run", str(w / "bad.toml")], write("bad.toml", bytes(range(256)))))
    add(Case("config file", "duplicate key", lambda w: ["run", str(w / "bad.toml")], write("bad.toml", "[run]\nseed=1\nseed=2\n")))
    add(Case("config file", "JSON instead of TOML", lambda w: ["run", str(w / "bad.json")], write("bad.json", '{"run": {"seed": 1}}')))
    add(Case("config file", "symlink loop", lambda w: ["run", str(w / "loop.toml")], lambda w: os.symlink(w / "loop.toml", w / "loop.toml")))
    add(Case("config file", "validate: not UTF-8", lambda w: ["validate", str(w / "bad.toml")], write("bad.toml", b"\xff\xfe\x00")))
    add(Case("config file", "section is a value", lambda w: ["run", str(w / "bad.toml")], write("bad.toml", "run = 5\n")))

    # Command-line misuse.
    for argv in (
        ["frobnicate"], ["run", "--frobnicate"], ["run", "a.toml", "b.toml"], ["run", "--resume"],
        ["run", "--nproc-per-node", "0"], ["run", "--nproc-per-node", "-1"], ["run", "--nnodes", "2"],
        ["run", "--nnodes", "2", "--node-rank", "5", "--rdzv-endpoint", "127.0.0.1:29999"],
        ["run", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "nohost"], ["run", "--node-rank", "1"],
        ["run", "--backend", "nope"], ["eval", "--benchmarks", "nope", "--data-root", "."], ["eval", "--benchmarks", "vsp"],
        ["eval", "--contexts", "nobody"], ["eval", "--mode", "vt", "--benchmarks", "vsp", "--data-root", ".", "--mode", "x"],
        ["eval", "--predictions", "cfg.toml"], ["eval", "--limit", "0"], ["infer", "--context", "oracle"],
        ["infer", "--checkpoint", "nope"], ["export", "nope", "--out", "x"], ["export", ".", "--out", "x", "--max-shard-size", "abc"],
        ["plan", "--gpus", "0"], ["plan", "--gpu-memory", "-1"], ["plan", "--gpu-memory", "nan"], ["list", "frobnicators"],
        ["examples", "--copy", "cfg.toml"],
    ):  # fmt: skip
        add(Case("command line", " ".join(argv), lambda w, argv=argv: list(argv)))
    add(Case("command line", "infer --index 99999", lambda w: ["infer", str(w / "cfg.toml"), "--index", "99999"]))
    add(Case("command line", "--resume a missing directory", lambda w: ["run", "--resume", str(w / "nope")]))
    add(Case("command line", "--resume a file", lambda w: ["run", "--resume", str(w / "cfg.toml")]))
    add(Case("command line", "--resume a directory without config.toml", lambda w: ["run", "--resume", str(w / "x")],
             write("x/results.json", "{}")))  # fmt: skip

    # Names that leave the output directory.
    for name in ["../../escaped", "/tmp/opsd-red-team-absolute", ".", "..", "a/../../b", "", "x" * 300, "a\u0000b"]:
        add(Case("path traversal", f"run.name={name[:20]!r}", short_run("--set", f"run.name={json.dumps(name)}")))
    add(Case("path traversal", "run.name='~' (a folder of that name)", short_run("--set", 'run.name="~"'), error_due=False))
    add(Case("path traversal", "output_dir is a file", short_run("--set", f"run.output_dir={json.dumps('cfg.toml')}")))
    add(Case("path traversal", "export --out a non-empty folder",
             lambda w: ["export", str(step_dir(w, 4)), "--out", str(w / "bench")], steps(finished, benchmark_root)))  # fmt: skip
    add(Case("path traversal", "export --out the run itself",
             lambda w: ["export", str(step_dir(w, 4)), "--out", str(run_dir(w))], finished))  # fmt: skip

    # Files of the run directory, on resume.
    config_of = lambda w: run_dir(w) / "config.toml"  # noqa: E731
    for label, content in [("empty", b""), ("garbage", b"\x00\x01[[["), ("not UTF-8", b"[run]\nname='\xff'\n"),
                           ("invalid value", None)]:  # fmt: skip
        change = (lambda data: data.replace(b"lr = ", b"lr = -")) if content is None else (lambda data, c=content: c)
        add(Case("run directory", f"config.toml {label}", resume(), steps(unfinished, edit(config_of, change))))
    add(Case("run directory", "config.toml missing", resume(), steps(unfinished, lambda w: config_of(w).unlink())))
    metrics_of = lambda w: run_dir(w) / "metrics.jsonl"  # noqa: E731
    results_of = lambda w: run_dir(w) / "results.json"  # noqa: E731
    add(Case("run directory", "metrics.jsonl last line cut", resume(), steps(unfinished, edit(metrics_of, lambda d: d + b'{"phase": "op')),
             error_due=False, check=metrics_each_step_once))  # fmt: skip
    add(Case("run directory", "metrics.jsonl garbage line", resume(), steps(unfinished, edit(metrics_of, lambda d: b"garbage\n" + d))))
    add(Case("run directory", "metrics.jsonl not UTF-8", resume(), steps(unfinished, edit(metrics_of, lambda d: b"\xff\xfe\n" + d))))
    add(Case("run directory", "metrics.jsonl missing", resume(), steps(unfinished, lambda w: metrics_of(w).unlink()),
             error_due=False, allow_new=True))  # fmt: skip
    for label, change in [("cut", lambda d: d[: len(d) // 2]), ("empty", lambda d: b""), ("a JSON list", lambda d: b"[1, 2]"),
                          ("not UTF-8", lambda d: b"\xff" + d), ("phase not an object", lambda d: b'{"start": 3}')]:  # fmt: skip
        add(Case("run directory", f"results.json {label}", resume(), steps(unfinished, edit(results_of, change))))
    add(Case("run directory", "stale .lock from a crashed run", resume(), steps(unfinished, write("runs/quickstart/.lock", "pid 1 on gone")),
             error_due=False, check=metrics_each_step_once))  # fmt: skip
    add(Case("run directory", "finished run resumed", resume(), finished, error_due=False))
    add(Case("run directory", "new run over a finished run", short_run(), finished))
    add(Case("run directory", "new run into a folder of user files", short_run(), write("runs/quickstart/notes.txt", "mine")))
    add(Case("run directory", "eval --out a training run --force", lambda w: rescore("--force")(w)[:-3] + ["--out", str(run_dir(w)), "--force"],
             steps(finished, predictions([GOOD_PREDICTION]))))  # fmt: skip

    # Checkpoints, on resume (step 2 is the one loaded).
    manifest_of = lambda w: step_dir(w) / "manifest.json"  # noqa: E731
    weights_of = lambda w: step_dir(w) / "student" / "model.safetensors"  # noqa: E731
    state_of = lambda w: step_dir(w) / "trainer_state.pt"  # noqa: E731
    checkpoint_faults = [
        ("manifest missing", lambda w: manifest_of(w).unlink()),
        ("manifest empty", edit(manifest_of, lambda d: b"")),
        ("manifest garbage", edit(manifest_of, lambda d: b"{{{")),
        ("manifest lists no files", edit_manifest(lambda m: m.update(files={}))),
        ("manifest names ../../x", edit_manifest(lambda m: m["files"].update({"../../x": next(iter(m["files"].values()))}))),
        ("manifest names an absolute path", edit_manifest(lambda m: m["files"].update({"/etc/hostname": next(iter(m["files"].values()))}))),
        ("manifest files is a list", edit_manifest(lambda m: m.update(files=list(m["files"])))),
        ("extra file not in the manifest", write("runs/quickstart/opsd/checkpoints/step-0000002/student/extra.bin", b"x")),
        ("weights flipped byte", edit(weights_of, lambda d: d[:-10] + bytes([d[-10] ^ 1]) + d[-9:])),
        ("weights truncated", edit(weights_of, lambda d: d[: len(d) // 2])),
        ("weights empty", edit(weights_of, lambda d: b"")),
        ("weights missing", lambda w: weights_of(w).unlink()),
        ("trainer state missing", lambda w: state_of(w).unlink()),
        ("trainer state truncated", edit(state_of, lambda d: d[: len(d) // 2])),
        ("trainer state garbage", edit(state_of, lambda d: b"garbage" * 10)),
        ("weights a symlink out of the run", lambda w: (weights_of(w).rename(w / "outside.safetensors"), weights_of(w).symlink_to(w / "outside.safetensors"))),
        ("step directory empty", lambda w: (shutil.rmtree(step_dir(w)), step_dir(w).mkdir())),
        ("student config.json garbage", edit(lambda w: step_dir(w) / "student" / "config.json", lambda d: b"{")),
    ]  # fmt: skip
    for label, fault in checkpoint_faults:
        add(Case("checkpoint", f"resume: {label}", resume(), steps(unfinished, fault)))
    for label, fault in checkpoint_faults[:3] + checkpoint_faults[8:10] + checkpoint_faults[15:16]:
        add(Case("checkpoint", f"eval --checkpoint: {label}", lambda w: ["eval", str(w / "cfg.toml"), "--checkpoint", str(step_dir(w))],
                 steps(unfinished, fault)))  # fmt: skip
        add(Case("checkpoint", f"export: {label}", lambda w: ["export", str(step_dir(w)), "--out", str(w / "exported")],
                 steps(unfinished, fault)))  # fmt: skip
    add(Case("checkpoint", "interrupted save left behind", resume(),
             steps(unfinished, lambda w: shutil.copytree(step_dir(w), step_dir(w).with_name(".tmp-step-0000003-999"))),
             error_due=False, check=checkpoint_kept(4)))  # fmt: skip

    # Resuming with a different config.
    for override in ["optim.lr=1e-3", "schedule.total_steps=6", "train.samples_per_step=4", 'backend.name="tiny-umm"',
                     'run.name="other"', 'run.output_dir="/tmp"', "divergence.beta=0.3", 'run.device="cpu:1"']:  # fmt: skip
        due = override != 'backend.name="tiny-umm"'
        add(Case("resume mismatch", f"--set {override}", resume("--set", override), unfinished, error_due=due,
                 check=None if due else metrics_each_step_once))  # fmt: skip
    add(Case("resume mismatch", "--allow-changes total_steps=6 recorded", resume("--set", "schedule.total_steps=6", "--allow-changes"),
             unfinished, error_due=False, check=config_shows("schedule.total_steps", "6")))  # fmt: skip
    add(Case("resume mismatch", "run.threads=2 (launch layout)", resume("--set", "run.threads=2"), unfinished,
             error_due=False, check=metrics_each_step_once, spawn=True))  # fmt: skip
    add(Case("resume mismatch", "resume with a CONFIG argument", lambda w: ["run", str(w / "cfg.toml"), "--resume", str(run_dir(w))],
             unfinished))  # fmt: skip

    # Non-finite values reached while training.
    add(Case("non-finite", "lr=1e30 (stop)", short_run("--set", "optim.lr=1e30", "--set", "optim.grad_clip=1e30"),
             allow_new=True, check=lambda w: None if (run_dir(w) / "config.toml").is_file() else "no run directory"))  # fmt: skip
    add(Case("non-finite", "lr=1e30 (skip)", short_run("--set", "optim.lr=1e30", "--set", 'train.on_non_finite="skip"'),
             error_due=False))  # fmt: skip
    add(Case("non-finite", "lr=1e30 on resume (allowed change)", resume("--set", "optim.lr=1e30", "--allow-changes"),
             unfinished, allow_new=True, check=checkpoint_kept(2)))  # fmt: skip

    # Kills at several moments, Ctrl-C, then resume.
    for fraction in (0.35, 0.6, 0.85):
        add(Case("kill and resume", f"SIGKILL at {fraction:.0%} of a run", short_run(), error_due=False,
                 check=metrics_each_step_once, runner=killed_then_resumed(fraction)))  # fmt: skip
    add(Case("kill and resume", "Ctrl-C mid-run", short_run(), error_due=False, check=metrics_each_step_once,
             runner=interrupted_then_resumed))  # fmt: skip

    # Concurrent writers.
    add(Case("concurrent writers", "resume while another process holds the run", resume(),
             lambda w: (unfinished(w), HOLDERS.append(hold_lock(w)))))  # fmt: skip
    add(Case("concurrent writers", "two new runs at once", short_run(), allow_new=True,
             check=metrics_each_step_once, runner=concurrent_new_runs))  # fmt: skip

    # The operating system refuses a write: a full disk, a read-only directory.
    for label, fault, setup, argv, allow in [
        ("read-only output_dir (mkdir)", "os.mkdir|*/runs/quickstart|EACCES", None, short_run(), False),
        ("read-only output_dir (config.toml)", "open|*/runs/quickstart/*config.toml*|EACCES", None, short_run(), False),
        ("read-only filesystem", "os.mkdir|*/runs*|EROFS", None, short_run(), False),
        ("disk full writing config.toml", "open|*/runs/quickstart/*config.toml*|ENOSPC", None, short_run(), False),
        ("disk full appending metrics", "open|*/metrics.jsonl|ENOSPC", None, short_run(), True),
        ("disk full writing a checkpoint", "open|*/.tmp-step-*/manifest.json|ENOSPC", unfinished, resume(), True),
        ("disk full creating a checkpoint", "os.mkdir|*/.tmp-step-0000004*|ENOSPC", unfinished, resume(), True),
        ("disk full writing results.json", "open|*/.results.json.tmp|ENOSPC", unfinished, resume(), True),
        ("disk full writing the report", "open|*report.md*|ENOSPC", unfinished, resume(), True),
        ("read-only rescore --out", "os.mkdir|*/rescored|EACCES", predictions([GOOD_PREDICTION]), rescore(), False),
        ("read-only export --out", "os.mkdir|*/exported*|EACCES", finished,
         lambda w: ["export", str(step_dir(w, 4)), "--out", str(w / "exported")], False),
    ]:  # fmt: skip
        kept = checkpoint_kept(2) if setup is unfinished else None
        add(Case("disk full / read-only", label, argv, setup, allow_new=allow, fault=fault, check=kept))

    # CUDA out of memory (injected: the step-4 save of a resumed run raises it).
    add(Case("out of memory", "CUDA OOM in the opsd phase", resume(), unfinished, allow_new=True,
             fault="os.mkdir|*/.tmp-step-0000004*|oom", check=checkpoint_kept(2)))  # fmt: skip

    # Benchmark data and predictions files (opsd eval, re-scoring without a model).
    for label, lines in [
        ("garbage line", ["garbage", GOOD_PREDICTION]), ("a JSON list", ["[1]", GOOD_PREDICTION]),
        ("missing response", [json.dumps({"benchmark": "vispuzzle", "index": 0}), GOOD_PREDICTION]),
        ("index not an integer", [json.dumps({"benchmark": "vispuzzle", "index": "x", "response": "A"}), GOOD_PREDICTION]),
        ("response a number", [json.dumps({"benchmark": "vispuzzle", "index": 0, "response": 3}), GOOD_PREDICTION]),
        ("unknown benchmark", [json.dumps({"benchmark": "nope", "index": 0, "response": "A"})]),
        ("index beyond the data", [json.dumps({"benchmark": "vispuzzle", "index": 999, "response": "A"})]),
        ("mode unknown", [json.dumps({"benchmark": "vispuzzle", "index": 0, "response": "A", "mode": "dream"})]),
    ]:  # fmt: skip
        add(Case("predictions file", label, rescore(), predictions(lines)))
    add(Case("predictions file", "not UTF-8", rescore(), steps(predictions([]), write("predictions.jsonl", b"\xff\xfe{"))))
    add(Case("predictions file", "results already there", rescore(),
             steps(predictions([GOOD_PREDICTION]), write("rescored/results.json", "{}"))))  # fmt: skip
    image = base64.b64encode(b"not a png").decode()
    for label, change in [
        ("answer column missing", lambda rows: [row.pop(rows[0].index("answer")) for row in rows[::-1]]),
        ("index not an integer", set_cell(1, "index", "zero")),
        ("image not base64", set_cell(1, "image", "!!!")),
        ("image not an image", set_cell(1, "image", image)),
        ("image cell empty", set_cell(1, "image", "")),
        ("answer cell empty", set_cell(1, "answer", "")),
        ("extra cell", lambda rows: rows[1].append("extra")),
        ("header only", lambda rows: rows.__delitem__(slice(1, None))),
    ]:  # fmt: skip
        add(Case("benchmark data", label, rescore(), bad_tsv(change)))
    add(Case("benchmark data", "file empty", rescore(), tsv_bytes(b"")))
    add(Case("benchmark data", "file not UTF-8", rescore(), tsv_bytes(b"\xff\xfe\x00\x01")))
    add(Case("benchmark data", "file missing", rescore(), lambda w: (predictions([GOOD_PREDICTION])(w), (w / "bench" / "VisPuzzle.tsv").unlink())))
    return cases


HOLDERS: list[subprocess.Popen] = []


