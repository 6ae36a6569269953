"""What the memory planner needs from torch: parameter counts of a model skeleton, the memory
of this machine's GPU and host, and the refusal ``opsd run`` gives a run that cannot fit.

Owns: :func:`census_of` (counting a module's parameters by group without touching weights),
:func:`run_plan` (a run config's plan from its built components), the device and host memory
queries, and :func:`refuse_unfit`.
Does not know: the estimate's formulas (:mod:`opsd_core.memory_plan`) or how a run proceeds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from opsd_core.components import Components
from opsd_core.config import RunConfig
from opsd_core.errors import ConfigError
from opsd_core.interfaces import Backend
from opsd_core.memory_plan import GIB, ParameterCensus, Plan, plan_run
from opsd_core.runtime import Ranks

SKIP_OPTION = "--skip-memory-check"


def census_of(
    model: torch.nn.Module, group_of: Callable[[str], str], trainable: Callable[[str], bool] | None = None
) -> ParameterCensus:
    """Parameter elements of ``model`` by ``group_of(name)``; ``trainable(name)`` says which train
    (None: every parameter, as training does today). Works on the meta device: only shapes and
    dtypes are read."""
    groups: dict[str, int] = {}
    trained = 0
    dtypes = set()
    for name, parameter in model.named_parameters():
        count = parameter.numel()
        group = group_of(name)
        groups[group] = groups.get(group, 0) + count
        trained += count if trainable is None or trainable(name) else 0
        dtypes.add(parameter.dtype)
    linears = tuple(
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    element = max((torch.empty((), dtype=dtype).element_size() for dtype in dtypes), default=4)
    return ParameterCensus(groups=groups, trainable=trained, bytes_per_element=element, linear_shapes=linears)


def model_census(backend: Backend) -> ParameterCensus:
    """The census of the model ``backend`` trains: counted on its meta-device skeleton when it
    declares one (no weights are read), else on the model :meth:`Backend.build_model` returns."""
    model = backend.model_skeleton() if backend.capabilities.meta_skeleton else backend.build_model()
    frozen = set(backend.frozen_parameters(model))
    return census_of(model, backend.parameter_group, lambda name: name not in frozen)


def run_plan(
    config: RunConfig,
    backend: Backend,
    fused_loss: bool,
    world_size: int,
    gpu_memory: int | None,
    host_memory: int | None,
) -> tuple[Plan, ParameterCensus]:
    """The plan of training ``config`` with ``backend`` in ``world_size`` processes against the
    given memory per GPU and per host (None: not checked), and the census behind it.
    ``fused_loss``: the divergence works on hidden states."""
    census = model_census(backend)
    shape = backend.memory_shape()
    result = plan_run(
        config, census, shape, world_size, fused_loss, gpu_memory, host_memory, backend.capabilities.sharding
    )
    return result, census


def gpu_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (None for a CPU)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free


def host_memory() -> int:
    """Bytes of host memory available now (``MemAvailable`` where the system reports it, else the
    physical total)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def refuse_unfit(components: Components, ranks: Ranks, device: torch.device) -> None:
    """Raise ``ConfigError`` with the plan's options when the run cannot fit this GPU's free
    memory (or the host's available memory). Rank 0 decides for every rank. Called before any
    weights are loaded, so nothing is checked on a CPU, nor for a backend without a meta
    skeleton (counting its parameters would build the model: ``opsd plan`` does that on request)."""
    available = gpu_memory(device)
    if available is None or not components.backend.capabilities.meta_skeleton:
        return
    message = None
    if ranks.is_main:
        result, _census = run_plan(
            components.config,
            components.backend,
            components.divergence.uses_hidden_states,
            ranks.world_size,
            available,
            host_memory(),
        )
        message = None if result.fits() else unfit_message(result)
    message = ranks.broadcast(message)
    if message:
        raise ConfigError(message)


def unfit_message(result: Plan) -> str:
    """One message: what the run needs against what there is, and the options."""
    e = result.estimate
    needs = f"about {e.gpu_peak / GIB:.1f} GiB per GPU" + (f" (during {e.peak_stage})" if e.peak_stage else "")
    has = f"{result.gpu_memory / GIB:.1f} GiB free" if result.gpu_memory is not None else "unknown"
    host = ""
    if result.host_memory is not None and e.host_peak > result.host_memory:
        host = f" and {e.host_peak / GIB:.1f} GiB of host memory ({result.host_memory / GIB:.1f} GiB available)"
    if result.fitting_switches:
        options = "set " + " and ".join(switch.setting for switch in result.fitting_switches)
    elif result.more_gpus is not None:
        gpus, settings = result.more_gpus
        options = f"train on {gpus} GPUs (--nproc-per-node {gpus})"
        options += " with " + " and ".join(switch.setting for switch in settings) if settings else ""
    else:
        options = "a GPU with more memory, more GPUs or a smaller model"
    return (
        f"this run needs {needs}{host}, and the GPU has {has}: it would run out of memory. Options: {options}; "
        f"see `opsd plan` with the same config for the breakdown, or pass {SKIP_OPTION} to run anyway "
        "(the figures are estimates)"
    )

