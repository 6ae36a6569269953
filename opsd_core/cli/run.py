"""The commands that run models: ``opsd run``, ``diagnose``, ``eval`` and ``infer``.

Owns: argument handling, the default config, and printing results.
Does not know: torch at import time; each command imports the experiment code when run.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from opsd_core.errors import ConfigError

DEFAULT_CONFIG = Path("examples") / "quickstart.toml"
_SET_HELP = "Override a config value: section.field=value (value parsed as a TOML literal). Repeatable."


def default_config_path() -> Path:
    """``examples/quickstart.toml`` in the working directory, else in the source tree."""
    here = Path.cwd() / DEFAULT_CONFIG
    if here.is_file():
        return here
    source_tree = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG
    if source_tree.is_file():
        return source_tree
    raise ConfigError(f"no CONFIG given and {DEFAULT_CONFIG} not found; pass a run config file")


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


@click.command("run")
@_config_argument
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue the run in this directory.")
@click.option("--no-progress", is_flag=True, help="No progress bars (e.g. in logs).")
def run_command(config_path: str | None, overrides: tuple[str, ...], resume_dir: str | None, no_progress: bool) -> None:
    """Run the whole method: KL diagnostic -> OPSD -> eval -> noise control -> eval -> report.

    With no CONFIG, runs examples/quickstart.toml: the embedded tiny UMM on frozen-lake.
    """
    from opsd_core.config import load_config
    from opsd_core.diagnostics.report import format_terminal, results_table
    from opsd_core.experiment import CONFIG, Experiment, prepare_run_directory

    if resume_dir is not None:
        saved = Path(resume_dir) / CONFIG
        if not saved.is_file():
            raise ConfigError(f"--resume: {resume_dir!r} holds no {CONFIG}; it is not a run directory")
        config = load_config(saved, overrides)
    else:
        config = _load(config_path, overrides)
    directory = prepare_run_directory(config, resume=resume_dir is not None)
    click.echo(f"Run directory: {directory}")
    results = Experiment(config, directory, echo=click.echo, progress=not no_progress).run()
    click.echo("")
    click.echo(format_terminal(results_table(results)))
    click.echo(f"\nReport: {directory / 'report.md'}")


def _model(experiment_config, checkpoint: str | None):
    from opsd_core.components import build_components
    from opsd_core.trainer.trainer import resolve_device

    components = build_components(experiment_config)
    model = components.backend.build_model()
    if checkpoint is not None:
        directory = Path(checkpoint)
        if (directory / "student").is_dir():
            from opsd_core.trainer.checkpoint import verify_checkpoint

            verify_checkpoint(directory)
            directory = directory / "student"
        components.backend.load_weights(model, directory)
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
    click.echo(json.dumps({"samples": len(problems), "kl": kl, "kl_noise": kl_noise}, indent=2))


@click.command("eval")
@_config_argument
@_checkpoint_option
@click.option("--modes", default="student,teacher,noise", show_default=True, help="Contexts to evaluate.")
def eval_command(config_path: str | None, overrides: tuple[str, ...], checkpoint: str | None, modes: str) -> None:
    """Greedy accuracy in the student, teacher and noise-VT contexts."""
    from opsd_core.evaluation import evaluate
    from opsd_core.evaluation.evaluate import MODES

    chosen = tuple(mode.strip() for mode in modes.split(",") if mode.strip())
    unknown = [mode for mode in chosen if mode not in MODES]
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {', '.join(MODES)} (got {modes!r})", param_hint="--modes")
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
