"""Optimizer-state offload: AdamW's moments in host memory between steps.

Owns: ``train.optimizer_offload`` in one-process runs. The optimizer stays a plain
``torch.optim.AdamW`` (its state dict, the schedule and checkpoints see nothing new); between
steps its per-parameter state tensors live in host memory (pinned when CUDA is present, so
copies overlap). A step moves the states of one chunk of parameters to their parameters'
device, lets AdamW update that chunk alone (the other parameters' gradients are hidden for the
call, and AdamW skips a parameter without one), moves them back and takes the next chunk: the
device holds at most one chunk of optimizer state. AdamW updates each parameter from its own
state only, so the chunked step is the same arithmetic as one step over everything.
Also the check that the host has room for the states.
Does not know: models, losses, sharding or the checkpoint layout.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from opsd_core.errors import ConfigError

CHUNK_BYTES = 1 << 30
"""Optimizer state (bytes) moved to the device at a time."""

ADAMW_STATES = 2
"""Tensors of a parameter's size AdamW keeps per parameter (first and second moments)."""


def available_host_bytes() -> int | None:
    """Host memory available to new allocations (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(parameters: Iterable[torch.Tensor], available: int | None = None) -> int:
    """Bytes of host memory the offloaded AdamW states of ``parameters`` need; ConfigError when
    the host has less available (``available``: measured when not given; unknown passes)."""
    needed = ADAMW_STATES * sum(p.numel() * p.element_size() for p in parameters)
    available = available_host_bytes() if available is None else available
    if available is not None and needed > available:
        raise ConfigError(
            f"train.optimizer_offload: the AdamW states need {_size(needed)} of host memory, "
            f"{_size(available)} is available (got true); free host memory, freeze or adapt fewer "
            "parameters, or set it to false"
        )
    return needed


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{count} bytes"


class OptimizerOffload:
    """Keeps ``optimizer``'s state tensors in host memory between steps (see the module)."""

    def __init__(self, optimizer: torch.optim.Optimizer, chunk_bytes: int = CHUNK_BYTES):
        self.optimizer, self.chunk_bytes = optimizer, chunk_bytes
        self.pin = torch.cuda.is_available()
        # Each state tensor's host buffer, kept while its values are on the device and reused.
        self._host: dict[tuple[int, str], torch.Tensor] = {}

    def step(self) -> None:
        """One optimizer step over every parameter that has a gradient, chunk by chunk."""
        with_grad = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        gradients = {id(p): p.grad for p in with_grad}
        try:
            for chunk in self._chunks(with_grad):
                members = {id(p) for p in chunk}
                for parameter in with_grad:
                    parameter.grad = gradients[id(parameter)] if id(parameter) in members else None
                self._move(chunk, to_host=False)
                self.optimizer.step()
                self._move(chunk, to_host=True)
        finally:
            for parameter in with_grad:
                parameter.grad = gradients[id(parameter)]
        if self.pin:
            torch.cuda.synchronize()

    def to_host(self) -> None:
        """Move every state tensor to host memory (after loading a state dict, which puts them
        on the parameters' device)."""
        self._move([p for group in self.optimizer.param_groups for p in group["params"]], to_host=True)
        if self.pin:
            torch.cuda.synchronize()

    def _chunks(self, parameters: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        chunks: list[list[torch.Tensor]] = [[]]
        size = 0
        for parameter in parameters:
            bytes_ = ADAMW_STATES * parameter.numel() * parameter.element_size()
            if chunks[-1] and size + bytes_ > self.chunk_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(parameter)
            size += bytes_
        return [chunk for chunk in chunks if chunk]

    def _move(self, parameters: list[torch.Tensor], to_host: bool) -> None:
        """Each parameter's state tensors of its own size (not AdamW's scalar step count) to
        host memory or to the parameter's device."""
        for parameter in parameters:
            state = self.optimizer.state.get(parameter)
            for key, value in (state or {}).items():
                if not torch.is_tensor(value) or value.shape != parameter.shape:
                    continue
                slot = (id(parameter), key)
                if to_host and value.device.type != "cpu":
                    host = self._host.pop(slot, None)
                    if host is None or host.shape != value.shape or host.dtype != value.dtype:
                        host = torch.empty_like(value, device="cpu", pin_memory=self.pin)
                    state[key] = host.copy_(value, non_blocking=self.pin)
                elif not to_host and value.device != parameter.device:
                    self._host[slot] = value
                    state[key] = value.to(parameter.device, non_blocking=self.pin)
