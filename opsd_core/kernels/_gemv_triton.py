"""Triton kernels of one-row matrix-vector products for decode steps (CUDA only).

Owns: ``y = x W^T (+ b) (+ r)`` for a single input row ``x`` over up to three weight matrices
stacked along the output (one launch for a layer's q, k and v projections), and the SwiGLU
product ``silu(x Wg^T) * (x Wu^T)`` in one pass over both weights. Each program owns a block
of output rows and reads its weight rows once, front to back, accumulating in float32; the
outputs are rounded to the input dtype exactly where ``torch.nn.functional.linear`` and the
elementwise ops round.
Does not know: modules, autograd or when these pay off (:mod:`opsd_core.kernels.gemv` decides).

Letters: K input features, N output features (N0 + N1 + N2 over the segments).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _input_chunk(x_ptr, cols, K, EVEN_K: tl.constexpr):
    """float32 input features ``cols`` (0 past K)."""
    if EVEN_K:
        return tl.load(x_ptr + cols).to(tl.float32)
    return tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)


@triton.jit
def _weight_chunk(w_ptr, offsets, cols, row_ok, K, EVEN: tl.constexpr):
    """(BLOCK_N, BLOCK_K) weight entries at row ``offsets`` and ``cols`` (0 outside)."""
    if EVEN:
        return tl.load(w_ptr + offsets + cols[None, :])
    return tl.load(w_ptr + offsets + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)


@triton.jit
def _dot_rows(
    x_ptr, w_ptr, rows, row_ok, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """float32 (BLOCK_N,) dot products of weight ``rows`` (row-major, K wide) with the input."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    offsets = rows.to(tl.int64)[:, None] * K
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = _input_chunk(x_ptr, cols, K, EVEN_K)
        acc += _weight_chunk(w_ptr, offsets, cols, row_ok, K, EVEN).to(tl.float32) * x[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _linear_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, b0_ptr, b1_ptr, b2_ptr, residual_ptr, out_ptr,
    K, N, N0, N1,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SEGMENTS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    first = tl.program_id(0) * BLOCK_N  # first output row of this program, over all segments
    # Every segment but the last is a multiple of BLOCK_N long (the wrapper sees to it), so a
    # block never straddles two; only the last segment's last block can hang past N.
    w_ptr, b_ptr, local = w0_ptr, b0_ptr, first
    if SEGMENTS > 1:  # noqa: SIM102  (SEGMENTS is a compile-time constant, first is not)
        if first >= N0:
            w_ptr, b_ptr, local = w1_ptr, b1_ptr, first - N0
            if SEGMENTS > 2:  # noqa: SIM102
                if first >= N0 + N1:
                    w_ptr, b_ptr, local = w2_ptr, b2_ptr, first - N0 - N1
    rows = local + tl.arange(0, BLOCK_N)
    out_rows = first + tl.arange(0, BLOCK_N)
    row_ok = out_rows < N
    y = _dot_rows(x_ptr, w_ptr, rows, row_ok, K, BLOCK_N, BLOCK_K, EVEN_K, EVEN)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + out_rows, mask=row_ok, other=0.0)
        y = (residual.to(tl.float32) + y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_rows, y, mask=row_ok)


@triton.jit
def _swiglu_kernel(
    x_ptr, gate_ptr, up_ptr, out_ptr, K, N,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    offsets = rows.to(tl.int64)[:, None] * K
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = _input_chunk(x_ptr, cols, K, EVEN_K)[None, :]
        acc_gate += _weight_chunk(gate_ptr, offsets, cols, row_ok, K, EVEN).to(tl.float32) * x
        acc_up += _weight_chunk(up_ptr, offsets, cols, row_ok, K, EVEN).to(tl.float32) * x
    dtype = out_ptr.dtype.element_ty
    # Rounded where the unfused ops round: each projection's output, silu's output, the product.
    gate = tl.sum(acc_gate, axis=1).to(dtype).to(tl.float32)
    up = tl.sum(acc_up, axis=1).to(dtype).to(tl.float32)
    activated = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(out_ptr + rows, (activated * up).to(dtype), mask=row_ok)


def block_config(n: int, k: int, swiglu: bool = False) -> dict:
    """Block sizes and launch settings for an (n, k) weight (sweeps over 28 layers of the 7B
    shapes on H200s, bf16: each within about 3 % of the best of 90 settings)."""
    if swiglu:
        return {"BLOCK_N": 4, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}
    if k >= 8192:  # the down projection's long rows: one row per program
        return {"BLOCK_N": 1, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 8 if n >= 65536 else 4, "BLOCK_K": 512, "num_warps": 4, "num_stages": 1}


def _settings(n: int, k: int, swiglu: bool, config: dict | None, inner: list[int] = ()) -> dict:
    """Launch settings; BLOCK_N halves until it divides every ``inner`` segment length."""
    settings = dict(config or block_config(n, k, swiglu))
    while any(length % settings["BLOCK_N"] for length in inner):
        settings["BLOCK_N"] //= 2
    settings["EVEN_K"] = k % settings["BLOCK_K"] == 0
    return settings


def linear(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """(N0 + N1 + ...,) outputs of the contiguous (K,) ``x`` against the stacked ``weights``,
    plus ``residual``."""
    k = x.shape[0]
    lengths = [w.shape[0] for w in weights]
    n = sum(lengths)
    settings = _settings(max(lengths), k, False, config, lengths[:-1])
    block = settings["BLOCK_N"]
    settings["EVEN"] = settings["EVEN_K"] and n % block == 0
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    padded = list(weights) + [weights[0]] * (3 - len(weights))
    bias_list = list(biases) + [biases[0]] * (3 - len(biases)) if biases is not None else padded
    _linear_kernel[(triton.cdiv(n, block),)](
        x, *padded, *bias_list, residual if residual is not None else x, out,
        k, n, lengths[0], lengths[1] if len(lengths) > 1 else 0,
        HAS_BIAS=biases is not None, HAS_RESIDUAL=residual is not None,
        SEGMENTS=len(weights), **settings,
    )  # fmt: skip
    return out


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """(N,) ``silu(x gate^T) * (x up^T)`` of the contiguous (K,) ``x``."""
    n, k = gate.shape
    settings = _settings(n, k, True, config)
    block = settings["BLOCK_N"]
    settings["EVEN"] = settings["EVEN_K"] and n % block == 0
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _swiglu_kernel[(triton.cdiv(n, block),)](x, gate, up, out, k, n, **settings)
    return out
