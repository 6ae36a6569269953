"""The run configuration's fixed sections (plugin sections are added in ``model.py``).

Owns: every training, sampling and output setting, with its default, constraint and
description. Defaults are the paper's recipe (docs/architecture.md, "The training recipe") except where a field says
otherwise; the shipped example configs override them for the embedded default.
Does not know: torch, plugins, or how the values are used.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from opsd_core.config.base import Section


class RunSection(Section):
    """Where a run writes and how it is seeded."""

    name: str = Field(
        "opsd-run",
        description="Run name; the run directory is output_dir/name, so one path component: no slash or "
        "backslash, not '.' or '..'.",
        min_length=1,
        max_length=200,
    )
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(0, description="Seed of the problem stream, sampling and noise.", ge=0, le=2**63 - 1)
    device: str = Field(
        "auto",
        description="The one device setting: 'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'. Every "
        "model is built there; multi-process runs put rank r on its node's local GPU r.",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Precision of forwards. 'bf16': models that train keep fp32 master weights, optimizer "
        "state and gradient reduction, and compute in bf16 (autocast in one process; FSDP's mixed precision, "
        "CUDA only, in several); models that only infer (`opsd eval`) are built in bf16. 'fp32': fp32 throughout.",
    )
    threads: int | None = Field(
        None, description="The one CPU threads setting of torch (None leaves torch's default).", ge=1, le=4096
    )

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        if name in (".", "..") or any(character in name for character in "/\\\0"):
            raise ValueError("must be one directory name inside output_dir: no slash or backslash, not '.' or '..'")
        return name


class PluginSection(Section):
    """A section that selects a registered plugin by ``name``; its other keys are that
    plugin's params, validated by the params model the plugin registered."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Registered name of the plugin entry (see `opsd list`).")


class LoraSection(Section):
    """``[backend.lora]``: train LoRA adapters (peft) instead of the model's weights. The base
    weights stay frozen and are shared by the start model, the student and the teacher; the
    EMA teacher follows the adapters; checkpoints hold the adapters and their optimizer state.
    Absent: no adapters, the trainable weights themselves train."""

    rank: int = Field(16, description="Rank r of each adapter: A is (r, in), B is (out, r).", ge=1, le=65536)
    alpha: float = Field(32.0, description="Scale numerator: an adapter adds (alpha / rank) B A to its weight.", gt=0)
    dropout: float = Field(
        0.0, description="Dropout on each adapter's input while the student trains (0: none).", ge=0, lt=1
    )
    target_modules: list[str] = Field(
        description="Layers to adapt (Linear, Embedding or Conv), each by its full module name, its last dotted "
        "parts (['q_proj', 'v_proj'] adapts every layer whose name ends in '.q_proj' or '.v_proj') or a pattern "
        "over full names with *, ? or [...] (fnmatch; 'language_model.*.mlp.up_proj'). A target that matches no "
        "layer is an error.",
        min_length=1,
    )

    @staticmethod
    def matches(name: str, target: str) -> bool:
        """Whether the layer ``name`` is adapted by ``target``: a pattern over full module names
        when it holds ``*``, ``?`` or ``[`` (fnmatch), else the full name or its last dotted
        parts (peft's rule)."""
        if any(character in target for character in "*?["):
            return fnmatch(name, target)
        return name == target or name.endswith("." + target)


class SamplingSection(Section):
    """On-policy sampling of student completions."""

    temperature: float = Field(1.0, description="Sampling temperature of on-policy completions.", gt=0)
    max_completion_tokens: int = Field(
        1024, description="Most tokens in one completion (injected image-skip tokens count).", ge=1
    )
    max_forward_tokens: int = Field(
        10240,
        description="Most positions in one teacher forward; longer completions are cut to fit, "
        "and the student uses the same cut.",
        ge=2,
    )
    max_image_skips: int = Field(
        1, description="Rounds that may be continued after the model asks for an image.", ge=0
    )
    whole_step: bool = Field(
        False,
        description="Decode the completions of all train.grad_accum micro-batches of a step in one batch (the "
        "weights gathered once) instead of one micro-batch at a time: fewer decoding passes, a larger KV cache. "
        "Greedy completions are the same either way; sampled ones come from another draw of the same stream.",
    )
    visual_thoughts: Literal["auto", "stored", "generate"] = Field(
        "auto",
        description="Where the teacher's visual thoughts come from during training: 'stored' uses the task's "
        "(a problem without one is an error), 'generate' draws one for every problem with the EMA teacher's "
        "own image generator, 'auto' draws only for problems that have none.",
    )


class OptimSection(Section):
    """AdamW and gradient clipping."""

    lr: float = Field(1e-5, description="Peak learning rate.", gt=0)
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-15, description="AdamW epsilon.", gt=0)
    weight_decay: float = Field(0.0, description="AdamW decoupled weight decay.", ge=0)
    grad_clip: float | None = Field(1.0, description="Max global gradient norm (None: no clipping).", gt=0)

    @model_validator(mode="after")
    def _betas_in_range(self) -> OptimSection:
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self


class ScheduleSection(Section):
    """Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr``."""

    warmup_steps: int = Field(200, description="Optimizer steps of linear warm-up from 0.", ge=0)
    total_steps: int = Field(1000, description="Optimizer steps of the whole run.", ge=1, le=10**9)
    min_lr: float = Field(1e-7, description="Learning rate at the end of the cosine decay.", ge=0)

    @model_validator(mode="after")
    def _warmup_fits(self) -> ScheduleSection:
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed total_steps ({self.total_steps})"
            )
        return self


class TrainSection(Section):
    """The optimisation loop, and how multi-process runs shard it (docs/distributed.md)."""

    samples_per_step: int = Field(
        1,
        description="Problems per micro-batch (one completion each), over all processes: in a "
        "multi-process run each rank takes an equal share, so it must be a multiple of the process count.",
        ge=1,
        le=1_000_000,
    )
    grad_accum: int = Field(2, description="Micro-batches per optimizer step.", ge=1, le=1_000_000)
    on_non_finite: Literal["stop", "skip"] = Field(
        "stop",
        description="A step whose loss or gradient norm is infinite or NaN: 'stop' ends the run with an error "
        "(the last checkpoint stays the newest), 'skip' drops that step's update; either way the event is "
        "recorded in metrics.jsonl.",
    )
    checkpoint_every: int = Field(500, description="Optimizer steps between checkpoints (0: only the last).", ge=0)
    keep_checkpoints: int = Field(2, description="Newest checkpoints to keep; older ones are deleted.", ge=1)
    log_every: int = Field(10, description="Optimizer steps between metric lines.", ge=1)
    replicate: int = Field(
        1,
        description="Multi-process runs: replica groups of the HSDP mesh (1: plain FSDP, every rank holds "
        "one shard); the processes must divide evenly into them. Unused by single-process runs.",
        ge=1,
    )
    shard: int | None = Field(
        None,
        description="Multi-process runs: ranks each model is sharded over within a replica group (None: "
        "all processes / replicate); replicate x shard must equal the number of processes.",
        ge=1,
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each transformer layer's activations in backward instead of storing them "
        "(less memory, about one more forward of compute); one-process and multi-process runs alike.",
    )
    optimizer_offload: bool = Field(
        False,
        description="One-process runs: keep AdamW's moments in host memory (pinned on CUDA) between steps "
        "and move them to the device one chunk at a time for the step, so the device holds no optimizer "
        "state between steps; updates are the same as without. Needs host memory for two copies of the "
        "trainable parameters.",
    )


class EvalSection(Section):
    """Greedy evaluation of the student, teacher and noise-VT contexts."""

    limit: int | None = Field(None, description="Evaluate on the task's first `limit` problems (None: all).", ge=1)
    batch_size: int = Field(64, description="Problems decoded together.", ge=1)
    max_completion_tokens: int | None = Field(
        None, description="Completion cap at evaluation (None: sampling.max_completion_tokens).", ge=1
    )
    benchmarks: list[str] = Field(
        default_factory=list,
        description="Benchmark tasks (e.g. 'vsp', 'chartqa' of the opsd-benchmarks plugin) answered by the student "
        "during training every `every` steps, on a fixed subset, greedily in text mode; each one's accuracy is "
        "logged as `benchmark/<name>` beside the training metrics.",
    )
    every: int = Field(
        0, description="Training steps between evaluations of `benchmarks` (0: none during training).", ge=0
    )
    subset: int = Field(
        32,
        description="Questions of each benchmark evaluated during training: the same ones every time, drawn once "
        "with run.seed (a circular question brings all its option-rotated copies).",
        ge=1,
    )
    data_root: str | None = Field(
        None,
        description="Directory of the benchmarks' files (their VLMEvalKit TSVs or Hugging Face parquet releases), "
        "as `opsd eval --data-root` takes it; needed with `benchmarks`.",
        min_length=1,
    )

    @model_validator(mode="after")
    def _benchmarks_complete(self) -> EvalSection:
        if self.benchmarks and not self.every:
            raise ValueError("benchmarks are named but every is 0; set eval.every to the steps between evaluations")
        if self.every and not self.benchmarks:
            raise ValueError(f"every = {self.every} but no benchmarks are named; set eval.benchmarks (e.g. ['vsp'])")
        if self.benchmarks and self.data_root is None:
            raise ValueError("benchmarks are named but data_root is not; set eval.data_root to the benchmarks' files")
        return self
    latency_problems: int = Field(
        4,
        description="Problems answered one at a time, in the text and in the visual-thought context, after each "
        "evaluation, for the batch-1 latency in results.json and report.md (0: not measured).",
        ge=0,
    )


class DiagnosticsSection(Section):
    """The KL diagnostic of the paper's Eq. 4 and gap closure (Eq. 9)."""

    kl_samples: int = Field(256, description="On-policy student samples the KL is averaged over.", ge=1, le=10**7)
    batch_size: int = Field(64, description="Samples scored together.", ge=1)
    seed: int = Field(0, description="Seed of the diagnostic's problems, samples and noise.", ge=0)


class ExperimentSection(Section):
    """What `opsd run` does after the KL diagnostic: OPSD, then the controls, from the same start."""

    opsd: bool = Field(True, description="Train Visual-OPSD and evaluate it (false: only the controls that are on).")
    noise_control: bool = Field(True, description="Also train the Gaussian-noise-VT control and evaluate it.")
    sft_control: bool = Field(
        False,
        description="Also train the SFT control (cross-entropy on the task's text-only reasoning traces, in the "
        "student context, from the same start) and evaluate it.",
    )
    shuffled_vt_control: bool = Field(
        False,
        description="Also train the shuffled-VT control and evaluate it: the teacher sees the visual thought of "
        "another problem of the same step (a seeded derangement over the step's problems on all processes), so "
        "it has a VT-shaped context without the problem's own visual knowledge.",
    )

    @model_validator(mode="after")
    def _some_phase(self) -> ExperimentSection:
        if not (self.opsd or self.noise_control or self.sft_control or self.shuffled_vt_control):
            raise ValueError(
                "no training phase is on; set at least one of opsd, noise_control, sft_control, "
                "shuffled_vt_control to true"
            )
        return self


class LoggingSection(Section):
    """Where a run's scalars, config and media go, and which media are logged (docs/tracking.md)."""

    loggers: list[str] = Field(
        default_factory=lambda: ["jsonl"],
        description="Registered loggers (`opsd list loggers`) that receive every scalar, the resolved config and "
        "the media: e.g. ['jsonl', 'tensorboard', 'wandb']. 'jsonl' (metrics.jsonl and media/ in the run "
        "directory) is always on, listed or not.",
    )
    media_every: int = Field(
        0,
        description="Optimizer steps between media records during training (0: only the start checkpoint and "
        "the end of each phase). A record is each media problem's greedy completion, its visual thought and the "
        "per-token KL(teacher || student) of the completion.",
        ge=0,
    )
    media_problems: int = Field(
        4,
        description="How many of the first evaluation problems make the fixed media set (0: no media and no "
        "gallery in report.md).",
        ge=0,
        le=64,
    )
