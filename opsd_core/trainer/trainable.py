"""The trainable set: which parameters a phase trains, and copies that share the rest.

Owns: applying a backend's :meth:`~opsd_core.interfaces.Backend.frozen_parameters` to a model
(``requires_grad`` off for those), counting trainable and frozen
parameters, and the student copied from the start model with the frozen tensors shared rather
than copied (they never change, so one tensor serves the start model, the student and the
teacher).
Does not know: which parameters a model family freezes (the backend says), optimizers or
sharding.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from opsd_core.interfaces import Backend


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter elements of a model by whether training updates them."""

    trainable: int
    frozen: int

    def describe(self) -> str:
        """For the start-up output, e.g. ``'7.21 B trainable, 7.35 B frozen parameters'``."""
        return f"{_count(self.trainable)} trainable, {_count(self.frozen)} frozen parameters"


def _count(value: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return str(value)


def frozen_names(backend: Backend, model: torch.nn.Module) -> set[str]:
    """The backend's frozen parameter names, checked against ``model``'s parameters."""
    names = set(backend.frozen_parameters(model))
    unknown = sorted(names - {name for name, _ in model.named_parameters()})
    if unknown:
        raise ValueError(
            f"{type(backend).__name__}.frozen_parameters names parameters the model does not have, e.g. {unknown[:3]}"
        )
    return names


def freeze(backend: Backend, model: torch.nn.Module) -> ParameterCounts:
    """Turn ``requires_grad`` off for ``model``'s frozen parameters (in place; the others keep
    theirs); returns the counts."""
    frozen = frozen_names(backend, model)
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return parameter_counts(model)


def parameter_counts(model: torch.nn.Module) -> ParameterCounts:
    """Elements of ``model``'s parameters that take a gradient and that do not."""
    trainable = frozen = 0
    for parameter in model.parameters():
        if parameter.requires_grad:
            trainable += parameter.numel()
        else:
            frozen += parameter.numel()
    return ParameterCounts(trainable, frozen)


def student_from_start(backend: Backend, start: torch.nn.Module) -> torch.nn.Module:
    """A trainable copy of the (unsharded) ``start`` model whose frozen parameters are
    ``start``'s own tensors: only the trainable ones take new memory. ``start`` must not be
    trained; its ``requires_grad`` is left as it is."""
    frozen = frozen_names(backend, start)
    shared = {id(parameter): parameter for name, parameter in start.named_parameters() if name in frozen}
    student = copy.deepcopy(start, shared)
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name not in frozen)
    return student
