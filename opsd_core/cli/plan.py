"""``opsd plan``: will a run fit the GPUs and host at hand, and which switches would make it fit.

Owns: the command's options (GPU count, memory per GPU and per host, their validation),
printing the plan, and the plan's one line when a run did run out of GPU memory
(:func:`out_of_memory_message`, what ``opsd run`` ends with then).
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
    from opsd_core.memory_plan import format_plan

    result, census = plan_for(config, gpus, gpu_memory, host_memory)
    title = f"Memory plan: backend {config.backend.name}, {gpus} GPU{'s' if gpus > 1 else ''}"
    click.echo(format_plan(result, census, title))


def plan_for(config, gpus: int, gpu_memory: float | None, host_memory: float | None, built=None):
    """(the memory plan, the parameter census) of training ``config`` in ``gpus`` processes
    against ``gpu_memory`` / ``host_memory`` GiB (None: this machine's first GPU, if any, and
    the host's available memory); ``built``: the backend of :func:`planned_backend`, if at hand."""
    import torch

    from opsd_core.memory_census import host_memory as host_bytes
    from opsd_core.memory_census import run_plan
    from opsd_core.memory_plan import GIB
    from opsd_core.plugins import get_registries

    gpu_bytes = int(gpu_memory * GIB) if gpu_memory is not None else None
    if gpu_bytes is None and torch.cuda.is_available():
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    host = int(host_memory * GIB) if host_memory is not None else host_bytes()
    built = built or planned_backend(config)
    if gpus > 1 and not built.capabilities.sharding:
        raise click.BadParameter(
            f"backend {config.backend.name!r} trains on one device only (got {gpus})", param_hint="--gpus"
        )
    fused = get_registries().of("divergence").create(config.divergence.name, config.divergence).uses_hidden_states
    return run_plan(config, built, fused, gpus, gpu_bytes, host)


def planned_backend(config):
    """``config``'s backend built on the CPU: the plan counts the model on its meta-device
    skeleton (or a CPU copy), so a machine without the run's GPU plans it as well."""
    from opsd_core.components import build_backend

    return build_backend(config.model_copy(update={"run": config.run.model_copy(update={"device": "cpu"})}))


def out_of_memory_message(config, where: str, gpus: int) -> str:
    """What ``opsd run`` says when CUDA ran out of memory in ``where``: the memory planner's
    estimate of ``config`` in ``gpus`` processes on this machine's GPU, and what it suggests."""
    from opsd_core.memory_plan import GIB, switches_for

    message = f"CUDA ran out of memory in {where}"
    built = planned_backend(config)
    if not built.capabilities.meta_skeleton:
        return message + "; `opsd plan` with this config estimates what the run needs and which switches make it fit"
    result, _census = plan_for(config, gpus, None, None, built)
    estimate = result.estimate
    message += f"; the memory planner estimates {estimate.gpu_peak / GIB:.1f} GiB per GPU"
    message += f" (peak during {estimate.peak_stage})" if estimate.peak_stage else ""
    message += f" of the {result.gpu_memory / GIB:.1f} GiB this GPU has" if result.gpu_memory is not None else ""
    if result.fitting_switches:
        return message + "; it fits with " + " and ".join(switch.setting for switch in result.fitting_switches)
    if result.more_gpus is not None:
        count, settings = result.more_gpus
        needed = " with " + " and ".join(switch.setting for switch in settings) if settings else ""
        return message + f"; it fits on {count} GPUs (--nproc-per-node {count}){needed}"
    if result.gpu_memory is not None and not result.fits():
        return message + "; no memory saver makes it fit: a GPU with more memory, more GPUs or a smaller model"
    off = ", ".join(switch.setting for switch in switches_for(config, gpus))
    return message + (f"; memory savers still off: {off}" if off else "; every memory saver is on") + (
        ", or more GPUs (--nproc-per-node)"
    )
