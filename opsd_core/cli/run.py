"""The commands that run or write models: ``opsd run``, ``diagnose``, ``eval``, ``infer`` and ``export``.

Owns: argument handling, the default config, printing results, and re-launching ``opsd run``
through torchrun for multi-process training: on one machine (``--nproc-per-node``) or on
several, which meet at a c10d rendezvous (``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``:
:class:`Rendezvous`; a rendezvous that never completes is one line, ``opsd_core.cli.launch``).
Does not know: torch at import time; each command imports the experiment code when run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from opsd_core.cli.launch import launch_node, mark_started
from opsd_core.cli.plan import out_of_memory_message
from opsd_core.cli.shipped import backend_config_path, default_config_path
from opsd_core.errors import ConfigError, GpuOutOfMemoryError, OpsdError, is_out_of_memory, log_traceback

_SET_HELP = "Override a config value: section.field=value (value parsed as a TOML literal). Repeatable."
# What each torchrun worker runs: the same CLI, with the arguments that follow.
_WORKER = "from opsd_core.cli import main; main()"


def _load(config_path: str | None, overrides: tuple[str, ...]):
    from opsd_core.config import load_config

    return load_config(config_path or default_config_path(), overrides)


def _config_argument(function):
    function = click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE", help=_SET_HELP)(function)
    return click.argument("config_path", metavar="[CONFIG]", required=False, type=click.Path(dir_okay=False))(function)


def _checkpoint_option(function):
    return click.option(
        "--checkpoint",
        type=click.Path(exists=True, file_okay=False),
        help="Weights to use: a checkpoint step directory (its student, whole or sharded) or a saved model directory. "
        "Default: the backend's configured start checkpoint.",
    )(function)


@dataclass(frozen=True)
class Rendezvous:
    """Where the launchers of a multi-node run meet (torchrun's c10d rendezvous).

    Attributes:
        nodes: how many machines take part, each running one launcher.
        node_rank: this machine's place among them; node 0 hosts the rendezvous.
        host: the address of node 0, as every node reaches it.
        port: a free TCP port on node 0.
        timeout_s: how long a node waits for node 0 to answer, and node 0 for every node to join.
    """

    nodes: int
    node_rank: int
    host: str
    port: int
    timeout_s: int

    @classmethod
    def parse(cls, nodes: int, node_rank: int | None, endpoint: str | None, timeout_s: int) -> Rendezvous:
        """The rendezvous of ``opsd run``'s options; a missing or malformed one is a BadParameter."""
        if node_rank is None or endpoint is None:
            missing = " and ".join(name for name, value in (("--node-rank", node_rank), ("--rdzv-endpoint", endpoint)) if value is None)
            raise click.BadParameter(
                f"--nnodes {nodes} needs {missing}: each machine runs the same command with its own --node-rank "
                "(0 to N-1) and node 0's HOST:PORT as --rdzv-endpoint",
                param_hint="--nnodes",
            )
        if node_rank >= nodes:
            raise click.BadParameter(f"nodes are numbered 0 to {nodes - 1} (got {node_rank})", param_hint="--node-rank")
        host, _, port = endpoint.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")  # an IPv6 address in brackets
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise click.BadParameter(f"expected HOST:PORT, e.g. node0.cluster:29500 (got {endpoint!r})", param_hint="--rdzv-endpoint")
        return cls(nodes, node_rank, host, int(port), timeout_s)

    @property
    def endpoint(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def torchrun_options(self, run_id: str) -> list[str]:
        """torchrun's options for this node: node 0 hosts the rendezvous store, the others
        connect to it; ``run_id`` keeps two runs sharing an endpoint apart."""
        settings = f"is_host={str(self.node_rank == 0).lower()},join_timeout={self.timeout_s},read_timeout={self.timeout_s}"
        return [
            f"--nnodes={self.nodes}", f"--node-rank={self.node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={run_id}", f"--rdzv-conf={settings}",
        ]  # fmt: skip

    def wait_for_host(self) -> None:
        """Return once node 0 answers at the endpoint; a ConfigError after ``timeout_s``
        seconds without an answer (before anything is launched or written)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                    return
            except OSError:
                if time.monotonic() >= deadline:
                    raise ConfigError(
                        f"--rdzv-endpoint: nothing answered at {self.endpoint} within {self.timeout_s} s (got "
                        f"{self.endpoint!r}); start node 0 on that host first, check the address and port, or raise "
                        "--rdzv-timeout"
                    ) from None
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def torchrun_command(nproc_per_node: int, arguments: list[str], rendezvous: Rendezvous | None = None, run_id: str = "opsd") -> list[str]:
    """The command that runs ``opsd <arguments>`` in ``nproc_per_node`` processes on this
    machine through torchrun: alone (a standalone rendezvous on a free port), or as one node of
    ``rendezvous`` (``run_id`` names the run there)."""
    launch = ["--standalone"] if rendezvous is None else rendezvous.torchrun_options(run_id)
    return [
        sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc-per-node={nproc_per_node}",
        "--no-python", sys.executable, "-c", _WORKER, *arguments,
    ]  # fmt: skip


def _run_arguments(
    config_path: str | None,
    overrides: tuple[str, ...],
    resume_dir: str | None,
    no_progress: bool,
    allow_changes: bool,
    skip_memory_check: bool = False,
):
    """``opsd run``'s arguments for the workers (everything but the launch options)."""
    arguments = ["run"] + ([config_path] if config_path else [])
    for override in overrides:
        arguments += ["--set", override]
    if resume_dir is not None:
        arguments += ["--resume", resume_dir]
    flags = {"--no-progress": no_progress, "--allow-changes": allow_changes, "--skip-memory-check": skip_memory_check}
    return arguments + [flag for flag, given in flags.items() if given]


@click.command("run")
@_config_argument
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
@click.option(
    "--allow-changes",
    is_flag=True,
    help="With --resume: apply --set overrides that change what the run computes (refused otherwise); "
    "config.toml and changes.jsonl record them and the step they took effect.",
)
@click.option(
    "--backend",
    metavar="NAME",
    help="Run this backend: with no CONFIG, its shipped config examples/NAME.toml (e.g. thinkmorph); "
    "with a CONFIG, the same as --set backend.name=NAME.",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    metavar="N",
    help="Train in N processes on this machine (one per GPU; gloo on CPU): re-launches itself through "
    "torchrun with the same arguments. Inside a torchrun worker it must match torchrun's own count.",
)
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    metavar="N",
    help="Train on N machines: run this same command on each, with its own --node-rank and node 0's "
    "--rdzv-endpoint; each starts --nproc-per-node processes (default 1) and they meet through "
    "torchrun's c10d rendezvous. The run directory must be on a file system every machine sees.",
)
@click.option("--node-rank", type=click.IntRange(min=0), metavar="R", help="With --nnodes: this machine's number, 0 to N-1; node 0 hosts the rendezvous.")
@click.option("--rdzv-endpoint", metavar="HOST:PORT", help="With --nnodes: node 0's address, as every machine reaches it, and a free port there.")
@click.option(
    "--rdzv-timeout",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    metavar="SECONDS",
    help="With --nnodes: how long a node waits for node 0 to answer at --rdzv-endpoint, and node 0 for every node to join.",
)
@click.option(
    "--skip-memory-check",
    is_flag=True,
    help="Run even if the memory planner estimates that the run does not fit the GPU (see `opsd plan`).",
)
def run_command(
    config_path: str | None,
    overrides: tuple[str, ...],
    resume_dir: str | None,
    no_progress: bool,
    allow_changes: bool,
    backend: str | None,
    nproc_per_node: int | None,
    nnodes: int | None,
    node_rank: int | None,
    rdzv_endpoint: str | None,
    rdzv_timeout: int,
    skip_memory_check: bool,
) -> None:
    """Run the whole method: KL diagnostic -> OPSD -> eval -> noise control -> eval -> report.

    Scalars, the resolved config and media go to the loggers of ``[logging] loggers``
    (`opsd list loggers`); metrics.jsonl is always written.

    With no CONFIG, runs examples/quickstart.toml: the embedded tiny UMM on frozen-lake
    (with --backend NAME, examples/NAME.toml instead).
    With --nproc-per-node N > 1 (or when started by torchrun), training is sharded over the
    processes with the backend's FSDP2 setup; rank 0 alone prints and writes (docs/distributed.md).
    With --nnodes N > 1, each of N machines runs this command and they train as one job.
    """
    from opsd_core.config import config_changes, load_config, to_toml
    from opsd_core.rundir import CONFIG, LAUNCH_FIELDS, RunDirectory

    changes: dict = {}

    if backend is not None:
        if config_path is None and resume_dir is None:
            config_path = str(backend_config_path(backend))
        else:
            overrides = (f"backend.name={json.dumps(backend)}", *overrides)
    if resume_dir is not None and config_path is not None:
        raise click.UsageError(
            f"--resume continues with the run's own {CONFIG}, so CONFIG ({config_path}) would be ignored; drop it "
            "(change fields with --set and --allow-changes)"
        )
    if resume_dir is not None:
        saved = Path(resume_dir) / CONFIG
        if not saved.is_file():
            raise ConfigError(f"--resume: {resume_dir!r} holds no {CONFIG}; it is not a run directory")
        # The run continues where it is now, even if its directory was moved or copied.
        where = Path(resume_dir).resolve()
        located = (f"run.output_dir={json.dumps(str(where.parent))}", f"run.name={json.dumps(where.name)}")
        config = load_config(saved, (*located, *overrides))
        changes = config_changes(load_config(saved, located), config)
        refused = {key: change for key, change in changes.items() if key not in LAUNCH_FIELDS}
        if refused and not allow_changes:
            listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items())
            raise ConfigError(
                f"--resume would change what the run computes ({listed}); resume without these --set "
                "overrides, or pass --allow-changes to apply them from here on (recorded in config.toml "
                "and changes.jsonl)"
            )
    else:
        config = _load(config_path, overrides)
    from opsd_core.loggers.group import check_loggers, open_loggers
    from opsd_core.plugins import get_registries

    loggers = get_registries().logger
    check_loggers(config.logging.loggers, loggers)  # a missing tracker package: one line, before anything runs
    launched = "WORLD_SIZE" in os.environ
    if launched:
        mark_started()  # tells a multi-node launcher that its rendezvous completed
    rendezvous = None
    if nnodes is not None and nnodes > 1:
        rendezvous = Rendezvous.parse(nnodes, node_rank, rdzv_endpoint, rdzv_timeout)
    elif node_rank is not None or rdzv_endpoint is not None:
        raise click.BadParameter("--node-rank and --rdzv-endpoint go with --nnodes N > 1", param_hint="--nnodes")
    if rendezvous is not None and launched:
        raise click.BadParameter("torchrun already launched this process; drop --nnodes and its options", param_hint="--nnodes")
    if rendezvous is not None:  # the config is valid: meet the other nodes and start this one's processes
        if rendezvous.node_rank > 0:
            rendezvous.wait_for_host()
        arguments = _run_arguments(config_path, overrides, resume_dir, no_progress, allow_changes, skip_memory_check)
        command = torchrun_command(nproc_per_node or 1, arguments, rendezvous, config.run.name)
        raise SystemExit(launch_node(command, rendezvous.endpoint, rendezvous.nodes, rendezvous.timeout_s))
    if nproc_per_node is not None and nproc_per_node > 1 and not launched:  # the config is valid: start them
        arguments = _run_arguments(config_path, overrides, resume_dir, no_progress, allow_changes, skip_memory_check)
        raise SystemExit(subprocess.call(torchrun_command(nproc_per_node, arguments)))
    if nproc_per_node is not None and launched:
        started = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        if started != nproc_per_node:
            raise click.BadParameter(
                f"torchrun started {started} processes on this node (got {nproc_per_node}); drop the option "
                "when launching through torchrun yourself",
                param_hint="--nproc-per-node",
            )

    from opsd_core import runtime
    from opsd_core.diagnostics.report import format_terminal, results_table
    from opsd_core.experiment import Experiment
    from opsd_core.runtime import resolve_device

    run_dir = RunDirectory.of(config)
    with runtime.process_group(config, resolve_device(config.run.device)) as ranks:
        # Rank 0 writes the directory and holds it for the whole run; a second run is refused.
        with run_dir.lock() if ranks.is_main else contextlib.nullcontext():
            echo = click.echo if ranks.is_main else lambda *_: None
            fresh, experiment = resume_dir is None and not run_dir.holds_run(), None
            try:
                if ranks.is_main:
                    run_dir.create(to_toml(config), resume=resume_dir is not None)
                    if resume_dir is not None and changes:
                        run_dir.record_changes(changes, to_toml(config))
                ranks.barrier()
                echo(f"Run directory: {run_dir.path}")
                with open_loggers(config, run_dir.path, loggers, ranks.is_main) as group:
                    experiment = Experiment(
                        config, run_dir, echo=click.echo, progress=not no_progress, ranks=ranks, loggers=group,
                        memory_check=not skip_memory_check,
                    )  # fmt: skip
                    results = experiment.run()
            except BaseException as error:
                # A new run that failed before writing anything leaves no directory behind.
                if ranks.is_main and fresh and run_dir.discard_if_unstarted():
                    echo(f"Nothing was written; removed {run_dir.path}")
                if is_out_of_memory(error):  # the checkpoints written so far stay for a resume
                    where = experiment.where() if experiment is not None else "start-up (building the models)"
                    log = log_traceback()
                    try:
                        message = out_of_memory_message(config, where, ranks.world_size)
                    except Exception as planning:  # the plan is advice: its failure must not hide the cause
                        message = f"CUDA ran out of memory in {where} (no memory plan: {planning}); see `opsd plan`"
                    raise GpuOutOfMemoryError(f"{message}; full traceback in {log}") from None
                raise
    echo("")
    echo(format_terminal(results_table(results)))
    echo(f"\nReport: {run_dir.report_path}")


def _model(experiment_config, checkpoint: str | None, backend_only: bool = False):
    """(components or the backend alone, the model with ``checkpoint``'s weights, in eval mode)."""
    from opsd_core.components import build_backend, build_components

    if backend_only:
        components = build_backend(experiment_config, training=False)
    else:
        components = build_components(experiment_config, training=False)
    backend = components if backend_only else components.backend
    model = backend.build_model()
    if checkpoint is not None:
        from opsd_core.trainer.checkpoint import load_model

        from opsd_core.config import lora_settings

        load_model(backend, model, Path(checkpoint), adapters=lora_settings(experiment_config))
    return components, model.to(backend.device).eval()


@click.command("diagnose")
@_config_argument
@_checkpoint_option
@click.option("--per-token", is_flag=True,
              help="Also break the KL down by token, position, token class and the student's entropy: "
              "per_token.json, per_token.md and per_token.png in --out.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Where --per-token writes (default: per-token-start, or per-token-<checkpoint directory name>).")
def diagnose_command(
    config_path: str | None, overrides: tuple[str, ...], checkpoint: str | None, per_token: bool, out_dir: str | None
) -> None:
    """KL(teacher ctx || student ctx) and the noise-VT KL on on-policy samples (paper Eq. 4).

    With --per-token, the same draws are broken down: which tokens of the student's own
    completions carry the KL, at which positions, in which token classes (where the task
    defines them) and at which levels of the student's entropy (the share of the top 20 %,
    the forking rows).
    """
    from opsd_core.diagnostics.kl import kl_estimate, kl_gap, on_policy_draws

    if out_dir is not None and not per_token:
        raise click.BadParameter("--out goes with --per-token", param_hint="--out")
    config = _load(config_path, overrides)
    components, model = _model(config, checkpoint)
    problems = list(components.task.eval_problems(config.diagnostics.kl_samples))
    common = dict(batch_size=config.diagnostics.batch_size, seed=config.diagnostics.seed, sampler=components.sampler_with())
    draws = list(on_policy_draws(components.backend, model, model, model, problems, entropy=per_token, **common))
    kl = kl_estimate(draws)
    kl_noise = kl_gap(components.backend, model, model, model, problems, noise=True, **common)
    figures = {"samples": len(problems), "kl": kl.mean, "kl_se": kl.standard_error,
               "kl_noise": kl_noise.mean, "kl_noise_se": kl_noise.standard_error}  # fmt: skip
    if per_token:
        from opsd_core.diagnostics.per_token import per_token_analysis, write_per_token

        label = "start" if checkpoint is None else Path(checkpoint).resolve().name
        directory = Path(out_dir or f"per-token-{label}")
        analysis = per_token_analysis(draws, components.backend, components.task)
        title = f"Per-token KL(teacher || student), {label} checkpoint, {len(problems)} samples"
        write_per_token(directory, analysis, title)
        figures |= {"forking_share": analysis["forking_share"], "per_token": str(directory)}
    click.echo(json.dumps(figures, indent=2))


@click.command("eval")
@_config_argument
@_checkpoint_option
@click.option("--contexts", default="student,teacher,noise", show_default=True,
              help="Task evaluation: the contexts to answer in (student, teacher, noise).")
@click.option(
    "--benchmarks",
    metavar="NAMES",
    help="Evaluate on benchmark tasks instead of the task: comma-separated names of installed benchmarks "
    "(the opsd-benchmarks plugin's vsp, vispuzzle, blink-jigsaw, sat, blink, chartqa, vstar, mmvp, cv-bench; "
    "`opsd list tasks`), or 'all'. Needs --data-root.",
)
@click.option(
    "--data-root",
    type=click.Path(exists=True, file_okay=False),
    help="Directory holding the benchmarks' VLMEvalKit TSV files under their release names "
    "(or their Hugging Face parquet releases; see docs/evaluation.md).",
)
@click.option(
    "--predictions",
    type=click.Path(exists=True, dir_okay=False),
    help="Re-score recorded answers (JSONL: benchmark, index, response[, mode, tokens, seconds]) without a model.",
)
@click.option("--mode", "benchmark_modes", default="text", show_default=True,
              help="Benchmark mode(s): 'text' (no visual thought), 'vt' (with visual thoughts), or 'text,vt'.")
@click.option("--backend", metavar="NAME", help="With no CONFIG, use examples/NAME.toml; else --set backend.name=NAME.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Where predictions and results go.")
@click.option("--limit", type=click.IntRange(min=1), help="Answer only the first N items of each benchmark.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Items answered together.")
@click.option("--chartqa-gold-relative", is_flag=True,
              help="ChartQA: 5 % relative to the gold answer (ChartQA's definition) instead of the paper's harness, "
              "which measures it relative to the prediction.")
@click.option("--force", is_flag=True, help="With --predictions: replace results already in --out.")
@click.option("--max-visual-thoughts", type=click.IntRange(min=1), default=3, show_default=True,
              help="vt mode, backends with interleaved inference: images drawn per answer at most (the paper's harness: 3).")
@click.option("--judge", "judge_url", metavar="URL",
              help="Benchmarks: ask this OpenAI-compatible chat endpoint (base URL, with or without /v1) wherever the "
              "paper's harness asks its LLM judge; answers are cached in OUT/judge-cache.jsonl. Key, if any: "
              "$OPSD_JUDGE_API_KEY. Default: exact matching, no network.")
@click.option("--judge-model", metavar="NAME", help="With --judge: the model name sent in each request.")
@click.option("--judge-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              metavar="SECONDS", help="With --judge: seconds one request may take.")
@click.option("--judge-retries", type=click.IntRange(min=0), default=4, show_default=True, metavar="N",
              help="With --judge: further tries after a connection error, a timeout, HTTP 5xx or 429 (back-off 1 s, doubling).")
def eval_command(
    config_path: str | None,
    overrides: tuple[str, ...],
    checkpoint: str | None,
    contexts: str,
    benchmarks: str | None,
    data_root: str | None,
    predictions: str | None,
    benchmark_modes: str,
    backend: str | None,
    out_dir: str | None,
    limit: int | None,
    batch_size: int,
    chartqa_gold_relative: bool,
    force: bool,
    max_visual_thoughts: int,
    judge_url: str | None,
    judge_model: str | None,
    judge_timeout: float,
    judge_retries: int,
) -> None:
    """Greedy accuracy: of the task's student/teacher/noise contexts, or on the paper's benchmarks.

    Benchmarks: answers go to OUT/predictions.jsonl as they are produced (a crashed run resumes
    from them), then OUT/results.{json,md,png} hold accuracy, tokens and seconds per sample for
    each mode and OUT/items.jsonl how each item was scored (extracted answer, deciding rule, hit).
    With --predictions, recorded answers are scored and no model is loaded; the results go to
    --out (default: a new directory under the current one), never over earlier results unless
    --force is given. With --judge, the items the paper's harness sends to its LLM judge are
    decided by the endpoint named (cached in OUT/judge-cache.jsonl) and counted apart.
    """
    if benchmarks is None:
        if predictions or data_root or judge_url:
            raise click.BadParameter("--predictions, --data-root and --judge go with --benchmarks", param_hint="--benchmarks")
    if (judge_url is None) != (judge_model is None):
        raise click.BadParameter("--judge URL and --judge-model NAME go together", param_hint="--judge")
    if benchmarks is None:
        _task_eval(config_path, overrides, checkpoint, contexts)
        return
    from opsd_core.evaluation import harness
    from opsd_core.evaluation.benchmarks import benchmark_names

    try:
        names = benchmark_names(benchmarks)
    except (OpsdError, ValueError) as error:
        raise click.BadParameter(str(error), param_hint="--benchmarks") from None
    if data_root is None:
        raise click.BadParameter("--benchmarks needs --data-root (the directory of the TSV files)", param_hint="--data-root")
    chosen = [mode.strip() for mode in benchmark_modes.split(",") if mode.strip()]
    if not chosen or any(mode not in harness.MODES for mode in chosen):
        raise click.BadParameter(f"choose from {', '.join(harness.MODES)} (got {benchmark_modes!r})", param_hint="--mode")
    if predictions is not None:
        records = harness.read_predictions(Path(predictions))
        if out_dir is None:
            stem = f"rescored-{Path(predictions).resolve().parent.name or 'predictions'}"
            target, number = Path(stem), 1
            while target.exists():
                number += 1
                target = Path(f"{stem}-{number}")
        else:
            target = Path(out_dir)
        _refuse_training_run(target)
        existing = [name for name in harness.RESULTS if (target / name).exists()]
        if existing and not force:
            raise click.UsageError(
                f"{target} already holds results ({', '.join(existing)}); pass --force to replace them or --out elsewhere"
            )
    else:
        if backend is not None:
            if config_path is None:
                config_path = str(backend_config_path(backend))
            else:
                overrides = (f"backend.name={json.dumps(backend)}", *overrides)
        config = _load(config_path, overrides)
        backend_instance, model = _model(config, checkpoint, backend_only=True)
        target = Path(out_dir) if out_dir else Path(config.run.output_dir) / f"{config.run.name}-benchmarks"
        _refuse_training_run(target)
        max_tokens = config.eval.max_completion_tokens or config.sampling.max_completion_tokens
        for mode in chosen:
            harness.answer_benchmarks(backend_instance, model, names, Path(data_root), target, mode,
                                      batch_size, max_tokens, limit, config.run.seed,
                                      max_visual_thoughts=max_visual_thoughts)
        records = harness.read_predictions(target / harness.PREDICTIONS)
    records = [r for r in records if r.get("mode", "text") in chosen]
    from opsd_core.evaluation.judge import CACHE_FILE, JudgeClient, JudgeError

    judge = None
    if judge_url is not None:
        judge = JudgeClient(judge_url, judge_model, target / CACHE_FILE, judge_timeout, judge_retries)
    try:
        results, items = harness.score_predictions(records, names, Path(data_root), chartqa_gold_relative, limit, judge)
    except JudgeError as error:
        if predictions is not None:
            raise
        raise JudgeError(
            f"{error}. The answers are kept: score them later with --predictions {target / harness.PREDICTIONS} "
            f"--out {target} --force --judge URL --judge-model NAME"
        ) from None
    paths = harness.write_results(results, items, target)
    click.echo(harness.results_markdown(results))
    if judge is not None:
        decided = sum(item["judge"] is not None for item in items)
        click.echo(f"Judge {judge_model}: {decided} items on the judge path; {judge.sent} requests sent, "
                   f"{judge.cached} answers from {target / CACHE_FILE}")
    click.echo("Results: " + ", ".join(str(p) for p in paths))


def _refuse_training_run(target: Path) -> None:
    """Benchmark results never go into a training run's directory (its results.json is the run's)."""
    from opsd_core.rundir import RunDirectory

    if RunDirectory(target).holds_run():
        raise click.UsageError(
            f"--out {target} is a training run directory (it holds config.toml); write benchmark results elsewhere"
        )


def _task_eval(config_path: str | None, overrides: tuple[str, ...], checkpoint: str | None, contexts: str) -> None:
    from opsd_core.evaluation import evaluate
    from opsd_core.evaluation.evaluate import CONTEXTS

    chosen = tuple(name.strip() for name in contexts.split(",") if name.strip())
    unknown = [name for name in chosen if name not in CONTEXTS]
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {', '.join(CONTEXTS)} (got {contexts!r})", param_hint="--contexts")
    config = _load(config_path, overrides)
    components, model = _model(config, checkpoint)
    problems = list(components.task.eval_problems(config.eval.limit))
    results = evaluate(components.backend, model, components.task, problems, chosen, config.eval.batch_size,
                       seed=config.run.seed, sampler=components.evaluation_sampler())
    click.echo(json.dumps([result.summary() for result in results.values()], indent=2))


@click.command("infer")
@_config_argument
@_checkpoint_option
@click.option("--index", default=0, show_default=True, type=click.IntRange(min=0), help="Which evaluation problem.")
@click.option("--context", default="student", show_default=True, type=click.Choice(["student", "teacher", "noise"]),
              help="Answer without the visual thought (student), with it (teacher), or with a noise image instead.")
@click.option("--save-images", type=click.Path(file_okay=False), help="Write the problem image and VT as PNG here.")
def infer_command(config_path, overrides, checkpoint, index: int, context: str, save_images: str | None) -> None:
    """Answer one evaluation problem greedily and score the answer."""
    from opsd_core.evaluation import contexts_for, greedy_decode
    from opsd_core.images import save_png

    config = _load(config_path, overrides)
    components, model = _model(config, checkpoint)
    problems = components.task.eval_problems(index + 1)
    if index >= len(problems):
        raise click.BadParameter(f"the task has {len(problems)} evaluation problems (got {index})", param_hint="--index")
    problem = problems[index]
    tokens = greedy_decode(components.evaluation_sampler(), model, contexts_for(context, components.backend, [problem]), 1)[0]
    response = components.backend.decode(tokens)
    score = components.task.score(problem, response)
    click.echo(f"problem {problem.id}: {problem.question}")
    click.echo(f"response ({context} context): {response}")
    click.echo(f"correct: {score.correct}")
    if save_images:
        directory = Path(save_images)
        directory.mkdir(parents=True, exist_ok=True)
        save_png(problem.image, directory / f"{problem.id}-problem.png")
        if problem.visual_thought is not None:
            save_png(problem.visual_thought, directory / f"{problem.id}-visual-thought.png")
        click.echo(f"images written to {directory}")


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``5GB``, ``500MB``, ``2GiB`` or ``1000000`` (plain bytes)."""
    number = text.strip().upper().rstrip("BITMGK")
    unit = text.strip().upper()[len(number) :] or "B"
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value <= 0:
        raise click.BadParameter(f"{text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
    return int(value * _SIZE_UNITS[unit])


@click.command("export")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(), help="The directory to write (new, or empty).")
@click.option("--model", "which", type=click.Choice(["student", "teacher"]), default="student", show_default=True,
              help="Which model of the checkpoint: the trained student or the EMA teacher.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Dtype of the written weights (the released checkpoints are bf16).")
@click.option("--max-shard-size", "max_shard_size", metavar="SIZE",
              help="Split weights larger than SIZE (e.g. 5GB, 500MB) into shards with a safetensors index. "
              "Default: the family's (ThinkMorph: one ema.safetensors, as released).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="The run config, when CHECKPOINT is not inside its run directory (default: the run's config.toml).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override a field of the run config (e.g. backend settings this machine cannot serve). Repeatable.")
def export_command(
    checkpoint: str, out_dir: str, which: str, dtype: str, max_shard_size: str | None, config_path: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Write a checkpoint's model in its family's released layout (ThinkMorph: ema.safetensors,
    the two configs, tokenizer and ae.safetensors; Janus-Pro and Emu3: transformers'
    save_pretrained). CHECKPOINT is a step directory, RUN/<phase>/checkpoints/step-NNNNNNN; its
    manifest is verified first, and nothing is written unless the export completes."""
    from opsd_core.export import export_checkpoint

    max_shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    written = export_checkpoint(Path(checkpoint), Path(out_dir), which, dtype, max_shard_bytes, config_path, overrides)
    size = sum(path.stat().st_size for path in written)
    click.echo(f"exported the {which} of {checkpoint} to {out_dir} ({dtype}, {len(written)} files, {size / 1e9:.2f} GB)")


def add_run_commands(cli: click.Group) -> None:
    for command in (run_command, diagnose_command, eval_command, infer_command, export_command):
        cli.add_command(command)
