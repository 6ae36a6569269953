"""The commands that run models: ``opsd run``, ``diagnose``, ``eval`` and ``infer``.

Owns: argument handling, the default config, printing results, and re-launching ``opsd run``
through torchrun for multi-process training (``--nproc-per-node``).
Does not know: torch at import time; each command imports the experiment code when run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click

from opsd_core.cli.shipped import backend_config_path, default_config_path
from opsd_core.errors import ConfigError

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
        help="Weights to use: a checkpoint step directory (its student/) or a saved model directory. "
        "Default: the backend's configured start checkpoint.",
    )(function)


def torchrun_command(nproc_per_node: int, arguments: list[str]) -> list[str]:
    """The command that runs ``opsd <arguments>`` in ``nproc_per_node`` processes on this
    machine through torchrun (a standalone rendezvous on a free port)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
        "--no-python", sys.executable, "-c", _WORKER, *arguments,
    ]  # fmt: skip


def _run_arguments(
    config_path: str | None, overrides: tuple[str, ...], resume_dir: str | None, no_progress: bool, allow_changes: bool
):
    """``opsd run``'s arguments for the workers (everything but ``--nproc-per-node``)."""
    arguments = ["run"] + ([config_path] if config_path else [])
    for override in overrides:
        arguments += ["--set", override]
    if resume_dir is not None:
        arguments += ["--resume", resume_dir]
    return arguments + (["--no-progress"] if no_progress else []) + (["--allow-changes"] if allow_changes else [])


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
def run_command(
    config_path: str | None,
    overrides: tuple[str, ...],
    resume_dir: str | None,
    no_progress: bool,
    allow_changes: bool,
    backend: str | None,
    nproc_per_node: int | None,
) -> None:
    """Run the whole method: KL diagnostic -> OPSD -> eval -> noise control -> eval -> report.

    With no CONFIG, runs examples/quickstart.toml: the embedded tiny UMM on frozen-lake
    (with --backend NAME, examples/NAME.toml instead).
    With --nproc-per-node N > 1 (or when started by torchrun), training is sharded over the
    processes with the backend's FSDP2 setup; rank 0 alone prints and writes (docs/distributed.md).
    """
    from opsd_core.config import config_changes, load_config, to_toml
    from opsd_core.experiment import Experiment
    from opsd_core.rundir import CONFIG, LAUNCH_FIELDS, RunDirectory

    changes: dict = {}

    if backend is not None:
        if config_path is None and resume_dir is None:
            config_path = str(backend_config_path(backend))
        else:
            overrides = (f"backend.name={json.dumps(backend)}", *overrides)
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
    launched = "WORLD_SIZE" in os.environ
    if nproc_per_node is not None and nproc_per_node > 1 and not launched:  # the config is valid: start them
        arguments = _run_arguments(config_path, overrides, resume_dir, no_progress, allow_changes)
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
    from opsd_core.runtime import resolve_device

    run_dir = RunDirectory.of(config)
    with runtime.process_group(config, resolve_device(config.run.device)) as ranks:
        # Rank 0 writes the directory and holds it for the whole run; a second run is refused.
        with run_dir.lock() if ranks.is_main else contextlib.nullcontext():
            if ranks.is_main:
                run_dir.create(to_toml(config), resume=resume_dir is not None)
                if resume_dir is not None and changes:
                    run_dir.record_changes(changes, to_toml(config))
            ranks.barrier()
            echo = click.echo if ranks.is_main else lambda *_: None
            echo(f"Run directory: {run_dir.path}")
            try:
                results = Experiment(config, run_dir, echo=click.echo, progress=not no_progress, ranks=ranks).run()
            except BaseException:
                # A new run that failed before writing anything leaves no directory behind.
                if ranks.is_main and resume_dir is None and run_dir.discard_if_unstarted():
                    echo(f"Nothing was written; removed {run_dir.path}")
                raise
    echo("")
    echo(format_terminal(results_table(results)))
    echo(f"\nReport: {run_dir.report_path}")


def _model(experiment_config, checkpoint: str | None, backend_only: bool = False):
    """(components or the backend alone, the model with ``checkpoint``'s weights, in eval mode)."""
    from opsd_core.components import build_backend, build_components
    from opsd_core.runtime import resolve_device

    if backend_only:
        components = build_backend(experiment_config)
    else:
        components = build_components(experiment_config, training=False)
    backend = components if backend_only else components.backend
    model = backend.build_model()
    if checkpoint is not None:
        directory = Path(checkpoint)
        if (directory / "student").is_dir():
            from opsd_core.trainer.checkpoint import verify_checkpoint

            verify_checkpoint(directory)
            directory = directory / "student"
        from opsd_core import lora
        from opsd_core.config import lora_settings

        settings = lora_settings(experiment_config)
        if settings is not None and (directory / lora.ADAPTERS_FILE).is_file():
            lora.load_merged(model, settings, directory)  # a LoRA run's checkpoint holds adapters
        else:
            backend.load_weights(model, directory)
    return components, model.to(resolve_device(experiment_config.run.device)).eval()


@click.command("diagnose")
@_config_argument
@_checkpoint_option
def diagnose_command(config_path: str | None, overrides: tuple[str, ...], checkpoint: str | None) -> None:
    """KL(teacher ctx || student ctx) and the noise-VT KL on on-policy samples (paper Eq. 4)."""
    from opsd_core.diagnostics.kl import kl_gap

    config = _load(config_path, overrides)
    components, model = _model(config, checkpoint)
    problems = list(components.task.eval_problems(config.diagnostics.kl_samples))
    common = dict(batch_size=config.diagnostics.batch_size, max_tokens=config.sampling.max_completion_tokens,
                  temperature=config.sampling.temperature, seed=config.diagnostics.seed)
    kl = kl_gap(components.backend, model, model, model, problems, **common)
    kl_noise = kl_gap(components.backend, model, model, model, problems, noise=True, **common)
    figures = {"samples": len(problems), "kl": kl.mean, "kl_se": kl.standard_error,
               "kl_noise": kl_noise.mean, "kl_noise_se": kl_noise.standard_error}  # fmt: skip
    click.echo(json.dumps(figures, indent=2))


@click.command("eval")
@_config_argument
@_checkpoint_option
@click.option("--contexts", "modes", default="student,teacher,noise", show_default=True,
              help="Task evaluation: the contexts to answer in (student, teacher, noise).")
@click.option(
    "--benchmarks",
    metavar="NAMES",
    help="Evaluate on the paper's benchmarks instead of the task: comma-separated names from vsp, vispuzzle, "
    "blink-jigsaw, sat, blink, chartqa, vstar, mmvp, cv-bench, or 'all'. Needs --data-root.",
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
def eval_command(
    config_path: str | None,
    overrides: tuple[str, ...],
    checkpoint: str | None,
    modes: str,
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
) -> None:
    """Greedy accuracy: of the task's student/teacher/noise contexts, or on the paper's benchmarks.

    Benchmarks: answers go to OUT/predictions.jsonl as they are produced (a crashed run resumes
    from them), then OUT/results.{json,md,png} hold accuracy, tokens and seconds per sample for
    each mode and OUT/items.jsonl how each item was scored (extracted answer, deciding rule, hit).
    With --predictions, recorded answers are scored and no model is loaded; the results go to
    --out (default: a new directory under the current one), never over earlier results unless
    --force is given.
    """
    if benchmarks is None:
        if predictions or data_root:
            raise click.BadParameter("--predictions and --data-root go with --benchmarks", param_hint="--benchmarks")
        _task_eval(config_path, overrides, checkpoint, modes)
        return
    from opsd_core.evaluation import harness
    from opsd_core.evaluation.benchmarks import benchmark_names

    try:
        names = benchmark_names(benchmarks)
    except ValueError as error:
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
    results, items = harness.score_predictions(records, names, Path(data_root), chartqa_gold_relative, limit)
    paths = harness.write_results(results, items, target)
    click.echo(harness.results_markdown(results))
    click.echo("Results: " + ", ".join(str(p) for p in paths))


def _refuse_training_run(target: Path) -> None:
    """Benchmark results never go into a training run's directory (its results.json is the run's)."""
    from opsd_core.rundir import RunDirectory

    if RunDirectory(target).holds_run():
        raise click.UsageError(
            f"--out {target} is a training run directory (it holds config.toml); write benchmark results elsewhere"
        )


def _task_eval(config_path: str | None, overrides: tuple[str, ...], checkpoint: str | None, modes: str) -> None:
    from opsd_core.evaluation import evaluate
    from opsd_core.evaluation.evaluate import MODES

    chosen = tuple(mode.strip() for mode in modes.split(",") if mode.strip())
    unknown = [mode for mode in chosen if mode not in MODES]
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {', '.join(MODES)} (got {modes!r})", param_hint="--contexts")
    config = _load(config_path, overrides)
    components, model = _model(config, checkpoint)
    problems = list(components.task.eval_problems(config.eval.limit))
    results = evaluate(components.backend, model, components.task, problems, chosen, config.eval.batch_size,
                       config.eval.max_completion_tokens or config.sampling.max_completion_tokens, config.run.seed)
    click.echo(json.dumps([result.summary() for result in results.values()], indent=2))


@click.command("infer")
@_config_argument
@_checkpoint_option
@click.option("--index", default=0, show_default=True, type=click.IntRange(min=0), help="Which evaluation problem.")
@click.option("--mode", default="student", show_default=True, type=click.Choice(["student", "teacher", "noise"]))
@click.option("--save-images", type=click.Path(file_okay=False), help="Write the problem image and VT as PNG here.")
def infer_command(config_path, overrides, checkpoint, index: int, mode: str, save_images: str | None) -> None:
    """Answer one evaluation problem greedily and score the answer."""
    from opsd_core.evaluation import contexts_for, greedy_decode
    from opsd_core.images import save_png

    config = _load(config_path, overrides)
    components, model = _model(config, checkpoint)
    problems = components.task.eval_problems(index + 1)
    if index >= len(problems):
        raise click.BadParameter(f"the task has {len(problems)} evaluation problems (got {index})", param_hint="--index")
    problem = problems[index]
    context = contexts_for(mode, components.backend, [problem])
    tokens = greedy_decode(components.backend, model, context, 1,
                           config.eval.max_completion_tokens or config.sampling.max_completion_tokens)[0]
    response = components.backend.decode(tokens)
    score = components.task.score(problem, response)
    click.echo(f"problem {problem.id}: {problem.question}")
    click.echo(f"response ({mode} context): {response}")
    click.echo(f"correct: {score.correct}")
    if save_images:
        directory = Path(save_images)
        directory.mkdir(parents=True, exist_ok=True)
        save_png(problem.image, directory / f"{problem.id}-problem.png")
        if problem.visual_thought is not None:
            save_png(problem.visual_thought, directory / f"{problem.id}-visual-thought.png")
        click.echo(f"images written to {directory}")


def add_run_commands(cli: click.Group) -> None:
    for command in (run_command, diagnose_command, eval_command, infer_command):
        cli.add_command(command)
