"""``opsd plan``: will a run fit the GPUs and host at hand, and which switches would make it fit.

Owns: the command's options (GPU count, memory per GPU and per host, their validation) and
printing the plan.
Does not know: torch at import time, or the estimate's formulas (``opsd_core.memory_plan``);
the model is counted on its skeleton when the command runs (``opsd_core.memory_census``).
"""

from __future__ import annotations

import json
import math

import click

from opsd_core.cli.shipped import backend_config_path, default_config_path

_SET_HELP = "Override a config value: section.field=value (value parsed as a TOML literal). Repeatable."


def _positive_gib(context: click.Context, parameter: click.Parameter, value: str | None) -> float | None:
    """A memory size in GiB: a finite number above zero."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise click.BadParameter(f"must be a positive number of GiB, e.g. 80 (got {value!r})")
    return number


@click.command("plan")
@click.argument("config_path", metavar="[CONFIG]", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE", help=_SET_HELP)
@click.option("--backend", metavar="NAME", help="With no CONFIG, plan examples/NAME.toml; else --set backend.name=NAME.")
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="Training processes, one per GPU of one host (as `opsd run --nproc-per-node N`).",
)
@click.option(
    "--gpu-memory",
    callback=_positive_gib,
    metavar="GIB",
    help="Memory of one GPU in GiB. Default: this machine's first GPU (none: not checked).",
)
@click.option(
    "--host-memory",
    callback=_positive_gib,
    metavar="GIB",
    help="Host memory in GiB. Default: what this machine has available now.",
)
def plan_command(
    config_path: str | None,
    overrides: tuple[str, ...],
    backend: str | None,
    gpus: int,
    gpu_memory: float | None,
    host_memory: float | None,
) -> None:
    """Estimate the memory a training run needs per GPU and per host, without loading weights.

    Prints weights, gradients, optimizer state, EMA teacher, start model, activations (with and
    without checkpointing) and the KV caches of sampling and visual-thought drawing, then says
    whether the run fits and which memory savers, tried in order, would make it fit
    (docs/distributed.md, "Will it fit?").
    """
    from opsd_core.config import load_config

    if backend is not None:
        if config_path is None:
            config_path = str(backend_config_path(backend))
        else:
            overrides = (f"backend.name={json.dumps(backend)}", *overrides)
    config = load_config(config_path or default_config_path(), overrides)

    import torch

    from opsd_core.components import build_backend
    from opsd_core.memory_census import host_memory as host_bytes
    from opsd_core.memory_census import run_plan
    from opsd_core.memory_plan import GIB, format_plan
    from opsd_core.plugins import get_registries

    gpu_bytes = int(gpu_memory * GIB) if gpu_memory is not None else None
    if gpu_bytes is None and torch.cuda.is_available():
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    host = int(host_memory * GIB) if host_memory is not None else host_bytes()
    # The plan counts the model on its meta-device skeleton (or a CPU copy): a machine without
    # the run's GPU plans it as well.
    built = build_backend(config.model_copy(update={"run": config.run.model_copy(update={"device": "cpu"})}))
    if gpus > 1 and not built.capabilities.sharding:
        raise click.BadParameter(
            f"backend {config.backend.name!r} trains on one device only (got {gpus})", param_hint="--gpus"
        )
    fused = get_registries().of("divergence").create(config.divergence.name, config.divergence).uses_hidden_states
    result, census = run_plan(config, built, fused, gpus, gpu_bytes, host)
    title = f"Memory plan: backend {config.backend.name}, {gpus} GPU{'s' if gpus > 1 else ''}"
    click.echo(format_plan(result, census, title))
