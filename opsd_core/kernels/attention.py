"""Attention of one query position over a KV cache, for batch-1 decode steps.

A library attention call on one query position spends most of its time launching and tiling
for many queries (three kernels: scores, softmax, weighted values). :func:`one_query_attention`
scores every query head that shares a KV head against chunks of the cache in one launch and
merges the chunks in a second one (Triton, on CUDA).

Owns: the op (a torch custom op, so compiled decode layers keep it whole and CUDA graphs
capture it) and its plain-torch path elsewhere (CPU, no triton, float64, head widths that are
not powers of two); neither has a backward (decode steps run under ``torch.no_grad()``).
Does not know: RoPE, caches or models.

Rounding: the torch path scores in the inputs' dtype (float32 accumulation) and normalises the
softmax before rounding it to the values' dtype; the kernels keep scores in float32 and
normalise after the weighted sum, which is at least as accurate.

Shapes: H query heads, Hk KV heads (query head h reads KV head h // (H / Hk)), S keys, d head width.
"""

from __future__ import annotations

import torch

from opsd_core.kernels.gemv import _triton_imports


def available(q: torch.Tensor) -> bool:
    """Whether :func:`one_query_attention` on ``q`` runs the Triton kernels."""
    width = q.shape[-1]
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and width >= 16
        and width & (width - 1) == 0
        and _triton_imports()
    )


def one_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one position's queries over cached keys.

    Args:
        q: (H, d) queries (after RoPE).
        keys, values: (Hk, S, d) cached keys (after RoPE) and values; H a multiple of Hk.
        valid: bool (S,) keys that count; at least one must.

    Returns:
        (H, d) in ``q``'s dtype: sum_s softmax_s(q_h . k_s / sqrt(d)) v_s over valid s.
    """
    if q.dim() != 2 or keys.dim() != 3 or keys.shape != values.shape or keys.shape[2] != q.shape[1]:
        raise ValueError(
            f"expected q (H, d) and keys, values (Hk, S, d) of one d; got q {tuple(q.shape)}, "
            f"keys {tuple(keys.shape)}, values {tuple(values.shape)}"
        )
    if valid.shape != (keys.shape[1],) or valid.dtype != torch.bool:
        raise ValueError(f"valid must be bool ({keys.shape[1]},), one flag per key; got {valid.dtype} {tuple(valid.shape)}")
    if q.shape[0] % keys.shape[0]:
        raise ValueError(f"query heads ({q.shape[0]}) must be a multiple of KV heads ({keys.shape[0]})")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, keys, values)):
        raise RuntimeError("one_query_attention has no backward: call it under torch.no_grad() (decode steps)")
    return torch.ops.opsd.one_query_attention(q, keys, values, valid)


@torch.library.custom_op("opsd::one_query_attention", mutates_args=())
def _one_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if available(q):
        from opsd_core.kernels import _attention_triton

        return _attention_triton.one_query_attention(q.contiguous(), keys.contiguous(), values.contiguous(), valid.contiguous())
    return torch_attention(q, keys, values, valid)


@_one_query_attention.register_fake
def _(q, keys, values, valid):
    return torch.empty_like(q)


def torch_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`one_query_attention` in plain torch, on any device."""
    heads, width = q.shape
    kv_heads = keys.shape[0]
    queries = q.view(kv_heads, heads // kv_heads, width)  # (Hk, G, d): head h = kv * G + g
    scores = torch.matmul(queries, keys.transpose(-1, -2))  # (Hk, G, S)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * width**-0.5
    scores = scores.masked_fill(~valid, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)  # (Hk, G, d)
    return out.reshape(heads, width)
