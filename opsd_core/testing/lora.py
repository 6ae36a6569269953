"""LoRA on a backend's model, for backends' tests: a student with adapters must decode and
score exactly as the same model with its adapters merged into the weights.

Owns: :func:`check_lora_matches_merged`, which attaches ``[backend.lora]`` adapters the way a
run does (refusing targets the backend reads directly while decoding), gives them non-zero
values (:func:`randomise_adapters`), and compares seeded completions and the JSD loss of the
adapted student with those of a merged copy: it catches a decode path (a one-row kernel, a
captured graph) or a loss path that reads a weight without its adapter. And
:func:`adapted_layers`, the layers a target list picks.
Does not know: any backend; the comparison goes through the Backend interface.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from opsd_core import lora
from opsd_core.config import LoraSection
from opsd_core.divergences.jsd import JsdDivergence
from opsd_core.interfaces import FUSED_HEAD, Backend
from opsd_core.sampling import BatchedSampler
from opsd_core.trainer.loss import micro_batch_loss
from opsd_core.types import Problem

__all__ = ["adapted_layers", "check_lora_matches_merged", "merged_state_dict", "randomise_adapters"]

#: The full state dict of a model with its adapters merged, as export writes it.
merged_state_dict = lora.merged_state_dict


def _section(settings: LoraSection | Mapping[str, Any]) -> LoraSection:
    return settings if isinstance(settings, LoraSection) else LoraSection.model_validate(dict(settings))


def adapted_layers(model: torch.nn.Module, settings: LoraSection | Mapping[str, Any]) -> list[str]:
    """The names of the layers of ``model`` that ``[backend.lora]`` ``settings`` adapt, sorted
    (raises ``ConfigError`` for a target that matches none)."""
    return sorted({name for names in lora.targeted_modules(model, _section(settings)).values() for name in names})


def randomise_adapters(model: torch.nn.Module, seed: int = 1, scale: float = 0.2) -> None:
    """Give every adapter tensor of ``model`` seeded N(0, scale^2) values (a fresh adapter's B
    is zero, so merging it would change nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in lora.adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype) * scale)


def check_lora_matches_merged(
    backend: Backend,
    settings: LoraSection | Mapping[str, Any],
    problems: Sequence[Problem],
    max_tokens: int = 8,
    temperature: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Assert that a LoRA student of ``backend`` samples the same seeded completions as its
    merged copy and has the same JSD loss against the start model in the teacher context.

    Args:
        backend: builds the model; its ``weights_read_directly`` (all but the fused loss's
            head) refuses targets as a run would, raising ``ConfigError``.
        settings: ``[backend.lora]`` (the section or its keys).
        problems: problems with stored visual thoughts (the teacher contexts need them).
        max_tokens: completion cap of the sampler.
        temperature: sampling temperature (draws are keyed by each row's seed).
        rtol, atol: tolerance of the loss comparison (merging rounds W + (alpha / r) B A once).
    """
    section = _section(settings)
    start = backend.build_model().requires_grad_(False).eval()
    student = lora.base_sharing_copy(start)
    decoding_reads = [(pattern, reader) for pattern, reader in backend.weights_read_directly() if reader != FUSED_HEAD]
    lora.check_adapters(student, section, decoding_reads)
    lora.attach_adapters(student, section, seed=0)
    randomise_adapters(student)
    student.eval()
    merged = lora.merge_adapters(copy.deepcopy(student))
    assert not lora.has_adapters(merged)

    builder = backend.context_builder()
    pairs = [builder.build(problem, problem.visual_thought) for problem in problems]
    students, teachers = [pair.student for pair in pairs], [pair.teacher for pair in pairs]
    sampler = BatchedSampler(backend, temperature, max_tokens)
    seeds = list(range(11, 11 + len(problems)))
    completions = sampler.sample(student, students, seeds=seeds)
    merged_completions = sampler.sample(merged, students, seeds=seeds)
    assert torch.equal(completions.lengths, merged_completions.lengths), "LoRA and merged completions differ in length"
    assert torch.equal(completions.tokens, merged_completions.tokens), "LoRA and merged completions differ"

    divergence = JsdDivergence()
    with torch.no_grad():
        teacher_rows = backend.completion_logits(start, teachers, completions)

        def loss(model: torch.nn.Module) -> torch.Tensor:
            rows = backend.completion_logits(model, students, completions)
            per_row = divergence.per_token(rows.logits, teacher_rows.logits, rows.mask)
            return micro_batch_loss(per_row, rows.mask, len(problems))

        adapted, reference = loss(student), loss(merged)
    assert float(reference) > 0, "the start model and the adapted student agree: the check would prove nothing"
    torch.testing.assert_close(adapted, reference, rtol=rtol, atol=atol)
