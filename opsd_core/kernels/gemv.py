"""One-row linear layers for decode steps: what a backend's batch-1 decode step multiplies by.

A batch-1 decode step reads every weight once and does almost no arithmetic on it, so its
speed is memory bandwidth. Generic matrix kernels lose much of it on these shapes (a 512-row
k projection reached 0.47 TB/s on an H200, a SwiGLU's two projections 3.6 TB/s, see
``benchmarks/bench_decode_floor.py``); these functions read each weight row once, front to
back, and fuse what sits next to the product: several projections of one input (q, k, v) in
one pass, the SwiGLU activation, the residual add. (The RMSNorm before a projection stays a
separate small kernel: fused into every program of the product, it re-reads the input row
per program and made a 7B decode step 4 % slower on an H200.)

Owns: :func:`linear` and :func:`swiglu` on one input row, as torch custom ops (so a decode
layer compiled with ``torch.compile`` keeps them whole and CUDA graphs capture them), with Triton
kernels on CUDA and plain torch elsewhere (CPU, no triton, float64). Neither has a backward:
they are for decode steps, under ``torch.no_grad()``.
Does not know: models, caches or when a backend decodes; :func:`available` says whether the
kernels will run.

Rounding follows the unfused modules: each projection's output is rounded to the input dtype,
then the residual is added (and rounded); silu's output is rounded before the product.

Shapes: K input features, N output features (the sum over stacked weights).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available(x: torch.Tensor) -> bool:
    """Whether :func:`linear` / :func:`swiglu` on ``x`` run the Triton kernels (a CUDA tensor in
    float16, bfloat16 or float32, the triton package importable)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and _triton_imports()


def linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``cat([F.linear(x, w, b) for w, b]) + residual`` of one input row.

    Args:
        x: (K,) or any shape holding K elements (one row).
        weights: one to three (N_i, K) weights, stacked along the output.
        biases: None, or one (N_i,) bias per weight.
        residual: None, or (N,) added after the product is rounded.

    Returns:
        (N,) in ``x``'s dtype.
    """
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"linear takes one to three stacked weights, got {len(weights)}")
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"one bias per weight: got {len(biases)} biases for {len(weights)} weights")
    _check_weights(x, weights)
    for i, bias in enumerate(biases or []):
        if bias.shape != (weights[i].shape[0],):
            raise ValueError(f"bias {i} must have shape ({weights[i].shape[0]},), got {tuple(bias.shape)}")
    total = sum(w.shape[0] for w in weights)
    if residual is not None and residual.shape != (total,):
        raise ValueError(f"residual must have shape ({total},), one entry per output, got {tuple(residual.shape)}")
    padded = list(weights) + [None] * (3 - len(weights))
    bias_list = list(biases) + [None] * (3 - len(biases)) if biases is not None else [None] * 3
    return torch.ops.opsd.row_linear(x.reshape(-1), *padded, *bias_list, residual)


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(F.linear(x, gate)) * F.linear(x, up)`` of one input row ((K,) or any shape holding
    K elements) with (N, K) ``gate`` and ``up``: (N,) in ``x``'s dtype."""
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    _check_weights(x, [gate, up])
    return torch.ops.opsd.row_swiglu(x.reshape(-1), gate, up)


def _check_weights(x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    """Each weight is (N_i, K) for the K elements of ``x``, in ``x``'s dtype (the kernels read
    raw memory, so a mismatch must stop here), and nothing asks for a gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)):
        raise RuntimeError("the one-row kernels have no backward: call them under torch.no_grad() (decode steps)")
    for i, weight in enumerate(weights):
        if weight.dim() != 2 or weight.shape[1] != x.numel():
            raise ValueError(f"weight {i} must be (N, {x.numel()}) for an input row of {x.numel()}, got {tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            raise ValueError(f"weight {i} is {weight.dtype} but the input is {x.dtype}; cast one of them")


# ---------------------------------------------------------------------------------------------- the ops
@torch.library.custom_op("opsd::row_linear", mutates_args=())
def _row_linear(
    x: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor | None,
    w2: torch.Tensor | None,
    b0: torch.Tensor | None,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    weights = [w for w in (w0, w1, w2) if w is not None]
    biases = [b0, b1, b2][: len(weights)] if b0 is not None else None
    if available(x):
        from opsd_core.kernels import _gemv_triton

        return _gemv_triton.linear(
            x.contiguous(),
            [w.contiguous() for w in weights],
            [b.contiguous() for b in biases] if biases is not None else None,
            residual.contiguous() if residual is not None else None,
        )
    out = torch.cat([F.linear(x, w, None if biases is None else biases[i]) for i, w in enumerate(weights)])
    return out if residual is None else residual + out


@_row_linear.register_fake
def _(x, w0, w1, w2, b0, b1, b2, residual):
    n = sum(w.shape[0] for w in (w0, w1, w2) if w is not None)
    return x.new_empty(n)


@torch.library.custom_op("opsd::row_swiglu", mutates_args=())
def _row_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if available(x):
        from opsd_core.kernels import _gemv_triton

        return _gemv_triton.swiglu(x.contiguous(), gate.contiguous(), up.contiguous())
    return F.silu(F.linear(x, gate)) * F.linear(x, up)


@_row_swiglu.register_fake
def _(x, gate, up):
    return x.new_empty(gate.shape[0])
