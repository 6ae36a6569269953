"""The memory planner's arithmetic: how many bytes a training run holds per GPU and per host.

Owns: :class:`ParameterCensus` (parameter counts by group, as counted on a model skeleton),
:class:`MemoryInputs` (everything an estimate depends on, one small dataclass) and
:func:`inputs_from_config` (the one place that reads the run config for it), the estimate
itself (:func:`estimate`: weights, gradients, optimizer state, EMA teacher, start model,
activations with and without checkpointing, the sampler's and the visual-thought drawing's KV
caches), the memory-saving switches tried in order when a run does not fit (:func:`plan`), and
the text ``opsd plan`` prints.
Does not know: torch, models or devices. Counting a model's parameters and asking a device how
much memory it has belong to :mod:`opsd_core.memory_census`; the estimates are formulas, written
down in docs/distributed.md ("Will it fit?").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from opsd_core.config.model import lora_settings
from opsd_core.config.sections import LoraSection
from opsd_core.types import MemoryShape

if TYPE_CHECKING:
    from opsd_core.config import RunConfig

GIB = 1024**3
FP32_BYTES = 4
BF16_BYTES = 2
ADAM_STATES = 2  # AdamW's exp_avg and exp_avg_sq, each one element per trainable parameter
# Student logits, their log-softmax, its gradient and the teacher's logits, each fp32 (B, N + 1, V),
# when the divergence works on logits; a divergence on hidden states never builds them.
LOGIT_COPIES = 4
# FSDP keeps the unit being computed and the prefetched next one gathered.
GATHERED_UNITS = 2
# The GPU counts of one host the plan tries when a run fits none of the switches.
ONE_HOST_GPU_COUNTS = (2, 4, 8)


@dataclass(frozen=True)
class ParameterCensus:
    """A model's parameters, counted without weights (on its meta-device skeleton).

    Attributes:
        groups: parameter elements per module group (e.g. ``language_model``,
            ``language_model (generation expert)``, ``vit_model``).
        trainable: elements of the parameters that train (the rest are frozen).
        bytes_per_element: bytes of one master weight element (the skeleton's dtype).
        linear_shapes: ``(module name, in features, out features)`` of every linear layer,
            for counting LoRA adapters on the ones a target list names.
    """

    groups: Mapping[str, int]
    trainable: int
    bytes_per_element: int
    linear_shapes: tuple[tuple[str, int, int], ...] = ()

    @property
    def total(self) -> int:
        return sum(self.groups.values())

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    def lora_parameters(self, rank: int, targets: tuple[str, ...]) -> int:
        """Adapter elements of rank ``rank`` on every linear layer one of ``targets`` adapts
        (:meth:`LoraSection.matches`): r x (in + out) each."""
        return sum(
            rank * (inputs + outputs)
            for name, inputs, outputs in self.linear_shapes
            if any(LoraSection.matches(name, target) for target in targets)
        )


@dataclass(frozen=True)
class MemoryInputs:
    """Everything an estimate depends on; :func:`inputs_from_config` fills it from a run config.

    Defaults are what training does when a switch is off.

    Attributes:
        total_parameters: elements of all model parameters.
        trainable_parameters: elements that receive gradients and optimizer state (with LoRA:
            the adapters' elements).
        master_bytes: bytes per element of the master weights (and of gradients and AdamW state,
            which take the parameters' dtype).
        frozen_bytes: bytes per element of frozen weights.
        teacher_bytes: bytes per element of the teacher's own weights (4: the EMA teacher keeps
            fp32; a frozen teacher is a copy in the masters' dtype).
        compute_bytes: bytes per element of the forward's activations (2 under bf16 autocast).
        gathered_bytes: bytes per element of weights gathered whole for sampling and drawing in
            sharded runs (FSDP's parameter dtype).
        sampling_bytes: bytes per element of the sampler's KV cache (the dtype sampling runs in).
        world_size: training processes (one per GPU).
        shard_size: processes each model is sharded over (1 in a single process).
        gpus_per_host: processes on one host.
        offload_optimizer: AdamW state lives in host memory between steps.
        share_frozen: start model, student and EMA teacher share one copy of frozen weights.
        ema_update: the teacher follows the student after every step (the EMA teacher).
        lora_rank: LoRA adapter rank (0: no LoRA).
        activation_checkpointing: layers recompute their activations in backward.
        fused_loss: the divergence works on hidden states (no (B, N + 1, V) logits).
        rows: problems per micro-batch on one rank.
        sampled_rows: rows the sampler decodes together on one rank.
        sequence_tokens: positions of the longest student or teacher forward.
        completion_tokens: completion rows the loss reads per sample (N + 1).
        draws_visual_thoughts: the teacher draws visual thoughts during training.
        shape: the decoder's sizes (None: activations and KV caches are not estimated).
    """

    total_parameters: int
    trainable_parameters: int
    master_bytes: int = FP32_BYTES
    frozen_bytes: int = FP32_BYTES
    teacher_bytes: int = FP32_BYTES
    compute_bytes: int = FP32_BYTES
    gathered_bytes: int = FP32_BYTES
    sampling_bytes: int = FP32_BYTES
    world_size: int = 1
    shard_size: int = 1
    gpus_per_host: int = 1
    offload_optimizer: bool = False
    share_frozen: bool = False
    ema_update: bool = True
    lora_rank: int = 0
    activation_checkpointing: bool = False
    fused_loss: bool = False
    rows: int = 1
    sampled_rows: int = 1
    sequence_tokens: int = 1
    completion_tokens: int = 1
    draws_visual_thoughts: bool = False
    shape: MemoryShape | None = None

    @property
    def frozen_parameters(self) -> int:
        return self.total_parameters - self.trainable_parameters


def inputs_from_config(
    config: RunConfig,
    census: ParameterCensus,
    shape: MemoryShape | None,
    world_size: int,
    fused_loss: bool,
) -> MemoryInputs:
    """The estimate's inputs for ``config`` run in ``world_size`` processes on one host.

    ``fused_loss`` says whether the divergence works on hidden states (the built divergence's
    ``uses_hidden_states``).
    """
    train, sampling = config.train, config.sampling
    sharded = world_size > 1
    bf16 = config.run.precision == "bf16"
    fsdp_bf16 = sharded and bf16
    rows = max(train.samples_per_step // world_size, 1)
    whole_step = sampling.whole_step and train.grad_accum > 1
    positions = sampling.max_forward_tokens
    if shape is not None and shape.max_positions is not None:
        positions = min(positions, shape.max_positions)
    inputs = MemoryInputs(
        total_parameters=census.total,
        trainable_parameters=census.trainable,
        master_bytes=census.bytes_per_element,
        frozen_bytes=census.bytes_per_element,
        teacher_bytes=census.bytes_per_element if config.teacher.name == "frozen" else FP32_BYTES,
        ema_update=config.teacher.name == "ema",
        compute_bytes=BF16_BYTES if bf16 or fsdp_bf16 else census.bytes_per_element,
        gathered_bytes=BF16_BYTES if fsdp_bf16 else census.bytes_per_element,
        sampling_bytes=BF16_BYTES if fsdp_bf16 else census.bytes_per_element,
        world_size=world_size,
        shard_size=(train.shard or world_size // train.replicate) if sharded else 1,
        gpus_per_host=world_size,
        activation_checkpointing=train.activation_checkpointing,
        offload_optimizer=train.optimizer_offload,
        # One process shares the frozen weights of start model, student and teacher.
        share_frozen=not sharded,
        fused_loss=fused_loss,
        rows=rows,
        sampled_rows=rows * (train.grad_accum if whole_step else 1),
        sequence_tokens=positions,
        completion_tokens=min(sampling.max_completion_tokens, positions) + 1,
        draws_visual_thoughts=sampling.visual_thoughts != "stored" and shape is not None and shape.visual_thought_tokens > 0,
        shape=shape,
    )
    lora = lora_settings(config)
    if lora is not None:
        inputs = with_lora(inputs, census, lora.rank, tuple(lora.target_modules))
    return inputs


def with_lora(inputs: MemoryInputs, census: ParameterCensus, rank: int, targets: tuple[str, ...]) -> MemoryInputs:
    """``inputs`` with LoRA adapters of ``rank`` on ``targets``: only the adapters train, and
    the start model, student and teacher share the frozen base."""
    adapters = census.lora_parameters(rank, targets)
    return replace(
        inputs,
        total_parameters=census.total + adapters,
        trainable_parameters=adapters,
        lora_rank=rank,
        share_frozen=True,
    )


# ----------------------------------------------------------------------------- the estimate
def activation_bytes_per_token(shape: MemoryShape, compute_bytes: int, checkpointing: bool) -> int:
    """Bytes one token's forward keeps for backward across all layers.

    Without checkpointing each layer keeps (in the compute dtype) its attention inputs and
    outputs (norm output, q, k, v, attention output: 4 D + 2 D_kv) and its SwiGLU MLP's (norm
    output, gate, up, their product: 2 D + 3 I), plus the two fp32 norm inputs of the residual
    stream (2 x 4 D). With checkpointing each layer keeps only its fp32 input (4 D) and one
    layer at a time holds the full set while it is recomputed.
    """
    hidden, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim
    per_layer = compute_bytes * (6 * hidden + 2 * kv + 3 * shape.intermediate_size) + 2 * FP32_BYTES * hidden
    if checkpointing:
        return FP32_BYTES * hidden * shape.num_layers + per_layer
    return per_layer * shape.num_layers


def kv_cache_bytes(shape: MemoryShape, rows: int, positions: int, element_bytes: int) -> int:
    """Keys and values of every layer for ``rows`` x ``positions``."""
    return 2 * rows * positions * shape.num_layers * shape.num_kv_heads * shape.head_dim * element_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU and per host, by what holds them.

    Attributes:
        gpu: per-GPU terms that are held for the whole phase (weights, gradients, ...).
        gpu_transient: per-GPU terms of the step's stages, of which the largest adds to the
            held ones at the peak (the student's forward and backward, sampling, drawing visual
            thoughts, the optimizer step, the teacher update).
        activations_without_checkpointing / activations_with_checkpointing: the student's
            saved activations both ways (the one in effect is in ``gpu_transient``).
        host: per-host terms held while training (offloaded optimizer state, the parked start
            model).
        host_transient: per-host terms of moments, of which the larger adds to the held ones
            (loading the start model, writing a checkpoint).
    """

    gpu: dict[str, int]
    gpu_transient: dict[str, dict[str, int]]
    activations_without_checkpointing: int | None
    activations_with_checkpointing: int | None
    host: dict[str, int]
    host_transient: dict[str, int]

    @property
    def gpu_peak(self) -> int:
        return sum(self.gpu.values()) + max((sum(stage.values()) for stage in self.gpu_transient.values()), default=0)

    @property
    def peak_stage(self) -> str | None:
        if not self.gpu_transient:
            return None
        return max(self.gpu_transient, key=lambda stage: sum(self.gpu_transient[stage].values()))

    @property
    def host_peak(self) -> int:
        return sum(self.host.values()) + max(self.host_transient.values(), default=0)


def estimate(inputs: MemoryInputs) -> MemoryEstimate:
    """Per-GPU and per-host bytes of a training phase with ``inputs`` (formulas in
    docs/distributed.md, "Will it fit?")."""
    i = inputs
    shard = i.shard_size
    trainable, frozen = i.trainable_parameters, i.frozen_parameters
    model_bytes = trainable * i.master_bytes + frozen * i.frozen_bytes
    optimizer = ADAM_STATES * trainable * i.master_bytes // shard
    # The teacher's own copies: of every parameter, or of the trainable ones when the frozen
    # weights are shared with the student.
    teacher = (trainable if i.share_frozen else i.total_parameters) * i.teacher_bytes // shard
    start = (trainable * i.master_bytes if i.share_frozen else model_bytes) // shard
    sharded = i.world_size > 1
    gpu = {
        "weights": model_bytes // shard,
        "gradients": trainable * i.master_bytes // shard,
        "optimizer state": 0 if i.offload_optimizer else optimizer,
        "teacher": teacher,
        # A single process keeps the start model on its device; sharded runs park it in host memory.
        "start model": 0 if sharded else start,
    }
    host = {
        "optimizer state (offloaded)": optimizer * i.gpus_per_host if i.offload_optimizer else 0,
        "start model (parked)": start * i.gpus_per_host if sharded else 0,
    }
    host_transient = {
        # A checkpoint is read whole into host memory before it moves to the GPU or is sharded.
        "loading the start model": model_bytes,
        # Sharded runs write through torch.distributed.checkpoint: every rank stages its own
        # shards of student, teacher and optimizer state in host memory, none gathers more.
        "writing a checkpoint": (
            (model_bytes // shard + teacher + optimizer) * i.gpus_per_host if sharded else 0
        ),
    }
    stages: dict[str, dict[str, int]] = {}
    with_ckpt = without_ckpt = None
    gathered_whole = i.total_parameters * i.gathered_bytes if sharded else 0
    if i.shape is not None:
        shape = i.shape
        tokens = i.rows * i.sequence_tokens
        without_ckpt = activation_bytes_per_token(shape, i.compute_bytes, False) * tokens
        with_ckpt = activation_bytes_per_token(shape, i.compute_bytes, True) * tokens
        logits = 0 if i.fused_loss else LOGIT_COPIES * i.rows * i.completion_tokens * shape.vocab_size * FP32_BYTES
        if sharded:
            weight_copies = GATHERED_UNITS * i.total_parameters * i.gathered_bytes // max(shape.num_layers, 1)
        elif i.compute_bytes < i.master_bytes:
            weight_copies = trainable * i.compute_bytes  # autocast keeps its casts of trainable weights until backward
        else:
            weight_copies = 0
        stages["the student's forward and backward"] = {
            "activations": with_ckpt if i.activation_checkpointing else without_ckpt,
            "loss logits": logits,
            "weight copies": weight_copies,
        }
        stages["sampling"] = {
            "gathered student": gathered_whole,
            "sampler KV cache": kv_cache_bytes(shape, i.sampled_rows, i.sequence_tokens, i.sampling_bytes),
        }
        if i.draws_visual_thoughts:
            rows = i.rows * shape.visual_thought_passes
            stages["drawing visual thoughts"] = {
                "gathered teacher": gathered_whole,
                "drawing KV cache": kv_cache_bytes(shape, rows, shape.visual_thought_tokens, i.sampling_bytes),
            }
    elif sharded:
        stages["sampling"] = {"gathered student": gathered_whole}
    # AdamW's multi-tensor step holds sqrt(exp_avg_sq) for every trainable parameter at once.
    stages["the optimizer step"] = {"AdamW temporaries": 0 if i.offload_optimizer else trainable * i.master_bytes // shard}
    if i.ema_update and i.master_bytes < FP32_BYTES:
        # The update casts every trainable student weight to fp32 at once.
        stages["the teacher update"] = {"student weights in fp32": trainable * FP32_BYTES // shard}
    return MemoryEstimate(gpu, stages, without_ckpt, with_ckpt, host, host_transient)


# ----------------------------------------------------------------------------- switches and the plan
@dataclass(frozen=True)
class Switch:
    """A memory saver the plan may suggest.

    Attributes:
        setting: what a user sets, as ``--set`` takes it (or the command-line option).
        apply: ``inputs`` with the switch on.
    """

    setting: str
    apply: Callable[[MemoryInputs], MemoryInputs]


@dataclass(frozen=True)
class Plan:
    """An estimate against the memory at hand, and what would make the run fit.

    Attributes:
        inputs: the estimate's inputs.
        estimate: the estimate of the run as configured.
        gpu_memory: bytes one GPU has (None: unknown, not checked).
        host_memory: bytes one host has (None: unknown, not checked).
        fitting_switches: the first combination of switches (tried in order, fewest first)
            with which the run fits; None when none does or it fits as it is.
        switches: the switches that were tried.
        more_gpus: when nothing fits as planned, the fewest GPUs of one host (and the switches
            they need) with which it would; None when none does or none was tried.
        gpus_tried: the GPU counts tried for ``more_gpus``.
    """

    inputs: MemoryInputs
    estimate: MemoryEstimate
    gpu_memory: int | None
    host_memory: int | None
    fitting_switches: tuple[Switch, ...] | None
    switches: tuple[Switch, ...] = field(default=())
    more_gpus: tuple[int, tuple[Switch, ...]] | None = None
    gpus_tried: tuple[int, ...] = ()

    def fits(self) -> bool:
        return _fits(self.estimate, self.gpu_memory, self.host_memory)


def _fits(estimate_: MemoryEstimate, gpu_memory: int | None, host_memory: int | None) -> bool:
    return (gpu_memory is None or estimate_.gpu_peak <= gpu_memory) and (
        host_memory is None or estimate_.host_peak <= host_memory
    )


def switches_for(config: RunConfig, world_size: int) -> tuple[Switch, ...]:
    """The memory savers ``config`` leaves off that take effect in ``world_size`` processes,
    in the order the plan tries them."""
    train = config.train
    found = []
    if not train.activation_checkpointing:
        found.append(
            Switch("train.activation_checkpointing = true", lambda i: replace(i, activation_checkpointing=True))
        )
    if world_size == 1 and not train.optimizer_offload:  # one-process runs only
        found.append(Switch("train.optimizer_offload = true", lambda i: replace(i, offload_optimizer=True)))
    if config.run.precision == "fp32":
        if world_size > 1:
            bf16 = Switch(
                "run.precision = 'bf16'",
                lambda i: replace(i, compute_bytes=BF16_BYTES, gathered_bytes=BF16_BYTES, sampling_bytes=BF16_BYTES),
            )
        else:
            bf16 = Switch("run.precision = 'bf16'", lambda i: replace(i, compute_bytes=BF16_BYTES))
        found.append(bf16)
    return tuple(found)


def plan(
    inputs: MemoryInputs, switches: tuple[Switch, ...], gpu_memory: int | None, host_memory: int | None
) -> Plan:
    """Estimate ``inputs``; when it does not fit, try the switches that are off, one at a time in
    order, then every pair, and so on, and keep the first combination that fits."""
    from itertools import combinations

    current = estimate(inputs)
    found = None
    if not _fits(current, gpu_memory, host_memory):
        for count in range(1, len(switches) + 1):
            for combination in combinations(switches, count):
                changed = inputs
                for switch in combination:
                    changed = switch.apply(changed)
                if _fits(estimate(changed), gpu_memory, host_memory):
                    found = combination
                    break
            if found:
                break
    return Plan(inputs, current, gpu_memory, host_memory, found, switches)


def plan_run(
    config: RunConfig,
    census: ParameterCensus,
    shape: MemoryShape | None,
    world_size: int,
    fused_loss: bool,
    gpu_memory: int | None,
    host_memory: int | None,
    can_shard: bool,
) -> Plan:
    """The plan of ``config`` in ``world_size`` processes; when neither it nor any switch fits
    and the backend ``can_shard``, also the fewest GPUs of one host (2, 4 or 8) that would."""
    result = plan(
        inputs_from_config(config, census, shape, world_size, fused_loss),
        switches_for(config, world_size),
        gpu_memory,
        host_memory,
    )
    if result.fits() or result.fitting_switches or not can_shard:
        return result
    tried = tuple(count for count in ONE_HOST_GPU_COUNTS if count > world_size)
    for gpus in tried:
        wider = plan(
            inputs_from_config(config, census, shape, gpus, fused_loss), switches_for(config, gpus), gpu_memory, host_memory
        )
        if wider.fits() or wider.fitting_switches:
            return replace(result, more_gpus=(gpus, wider.fitting_switches or ()), gpus_tried=tried)
    return replace(result, gpus_tried=tried)


def _gib(value: int) -> str:
    return f"{value / GIB:8.2f} GiB"


def format_plan(plan_: Plan, census: ParameterCensus, title: str) -> str:
    """The text ``opsd plan`` prints: parameter counts, the per-GPU and per-host terms, the
    verdict and the switches that make the run fit."""
    i, e = plan_.inputs, plan_.estimate
    lines = [title, ""]
    lines.append(
        f"parameters: {census.total:,} ({census.trainable:,} trainable, {census.frozen:,} frozen), "
        f"{census.bytes_per_element} bytes each"
    )
    for group, count in census.groups.items():
        lines.append(f"  {group:<40} {count:>16,}")
    if i.lora_rank:
        lines.append(f"  LoRA adapters (rank {i.lora_rank}): {i.trainable_parameters:,} trainable")
    lines += ["", f"per GPU ({i.world_size} process{'es' if i.world_size > 1 else ''}, sharded over {i.shard_size}):"]
    for name, value in e.gpu.items():
        lines.append(f"  {name:<40} {_gib(value)}")
    for stage, terms in e.gpu_transient.items():
        lines.append(f"  during {stage}:")
        for name, value in terms.items():
            lines.append(f"    {name:<38} {_gib(value)}")
    if e.activations_without_checkpointing is not None:
        state = "on" if i.activation_checkpointing else "off"
        lines.append(
            f"  activations without / with checkpointing {_gib(e.activations_without_checkpointing)} / "
            f"{e.activations_with_checkpointing / GIB:.2f} GiB (checkpointing {state})"
        )
    else:
        lines.append("  activations and KV caches: not estimated (the backend declares no memory shape)")
    where = f" (during {e.peak_stage})" if e.peak_stage else ""
    available = f" of {_gib(plan_.gpu_memory).strip()}" if plan_.gpu_memory is not None else ""
    lines.append(f"  peak                                     {_gib(e.gpu_peak)}{available}{where}")
    lines += ["", f"per host ({i.gpus_per_host} GPU{'s' if i.gpus_per_host > 1 else ''}):"]
    for name, value in e.host.items():
        lines.append(f"  {name:<40} {_gib(value)}")
    for name, value in e.host_transient.items():
        lines.append(f"  while {name:<34} {_gib(value)}")
    host_available = f" of {_gib(plan_.host_memory).strip()}" if plan_.host_memory is not None else ""
    lines.append(f"  peak                                     {_gib(e.host_peak)}{host_available}")
    lines += ["", verdict(plan_)]
    return "\n".join(lines)


def verdict(plan_: Plan) -> str:
    """One paragraph: whether the run fits, and if not, what would make it fit."""
    e = plan_.estimate
    if plan_.gpu_memory is None and plan_.host_memory is None:
        return "fits: not checked (no GPU or host memory given)"
    if plan_.fits():
        return "fits: yes"
    short = []
    if plan_.gpu_memory is not None and e.gpu_peak > plan_.gpu_memory:
        short.append(f"needs {e.gpu_peak / GIB:.1f} GiB per GPU, {plan_.gpu_memory / GIB:.1f} GiB available")
    if plan_.host_memory is not None and e.host_peak > plan_.host_memory:
        short.append(f"needs {e.host_peak / GIB:.1f} GiB of host memory, {plan_.host_memory / GIB:.1f} GiB available")
    text = "fits: no (" + "; ".join(short) + ")"
    if plan_.fitting_switches:
        settings = " and ".join(switch.setting for switch in plan_.fitting_switches)
        return text + f". It fits with {settings}"
    tried = ", ".join(switch.setting for switch in plan_.switches) or "none available"
    text += f". No combination of the memory savers fits (tried: {tried})"
    if plan_.more_gpus is not None:
        gpus, settings = plan_.more_gpus
        needed = " with " + " and ".join(switch.setting for switch in settings) if settings else ""
        return text + f"; it fits on {gpus} GPUs (--gpus / --nproc-per-node {gpus}){needed}"
    if plan_.gpus_tried:
        return text + f", nor on up to {max(plan_.gpus_tried)} GPUs of one host"
    return text + "; it needs a GPU with more memory or a smaller model"
