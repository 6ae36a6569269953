"""The built-in components, registered through the same hooks as any plugin.

Owns: the names of the built-in roles. Everything heavy is named as a lazy ``"module:attr"``
string so that listing names imports no torch. The built-in commands are added by the CLI
(``opsd_core.cli``) in the same ``register_commands`` call as the plugins' commands: the
plugin manager sits below the CLI and never imports it.
"""

from __future__ import annotations

from opsd_core.contexts.params import PaperContextParams
from opsd_core.divergences.params import JsdParams, KlParams
from opsd_core.hookspecs import hookimpl
from opsd_core.sampling.params import BatchedSamplerParams
from opsd_core.teachers.params import EmaParams, FrozenParams


@hookimpl
def register_divergences(registry):
    registry.add(
        "jsd",
        "opsd_core.divergences.jsd:JsdDivergence",
        JsdParams,
        description="Generalized JSD_beta over the teacher's top-K, with clipping (the paper's loss).",
    )
    registry.add(
        "kl",
        "opsd_core.divergences.kl:ForwardKlDivergence",
        KlParams,
        description="Forward KL(teacher || student).",
    )
    registry.add(
        "reverse-kl",
        "opsd_core.divergences.kl:ReverseKlDivergence",
        KlParams,
        description="Reverse KL(student || teacher).",
    )


@hookimpl
def register_teacher_updates(registry):
    registry.add(
        "ema",
        "opsd_core.teachers.ema:EmaTeacher",
        EmaParams,
        description="EMA of the student, updated after every optimizer step (paper: decay 0.995).",
    )
    registry.add(
        "frozen",
        "opsd_core.teachers.frozen:FrozenTeacher",
        FrozenParams,
        description="The starting weights, never updated.",
    )


@hookimpl
def register_samplers(registry):
    registry.add(
        "batched",
        "opsd_core.sampling.sampler:batched_sampler",
        BatchedSamplerParams,
        description="Batched KV-cached sampling on the model's device, per-row seeded draws, the image-skip rule.",
    )


@hookimpl
def register_contexts(registry):
    registry.add(
        "paper",
        "opsd_core.contexts.paper:paper_context",
        PaperContextParams,
        description="The paper's layout: [system, image, question]; the teacher adds [ref_intro, VT, transition].",
    )


@hookimpl
def register_loggers(registry):
    registry.add(
        "jsonl",
        "opsd_core.loggers.jsonl:JsonlLogger",
        description="metrics.jsonl and the media pages in the run directory (always on).",
    )
    registry.add(
        "tensorboard",
        "opsd_core.loggers.tensorboard_logger:TensorBoardLogger",
        description="TensorBoard event files in trackers/tensorboard/ (pip install tensorboard).",
    )
    registry.add(
        "wandb",
        "opsd_core.loggers.wandb_logger:WandbLogger",
        description="Weights & Biases, offline in trackers/wandb/ unless WANDB_MODE says otherwise (pip install wandb).",
    )
