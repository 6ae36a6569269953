"""Triton kernels of one query position's grouped-query attention over a KV cache (CUDA only).

Owns: split-key attention in two launches. The first gives each (KV head, key chunk) pair a
program that scores the chunk against all query heads sharing that KV head, with a running
maximum and sum (online softmax) and its partial weighted values; the second merges each
query head's chunks. Many programs share a short cache this way, which one program per head
could not fill the GPU with.
Does not know: RoPE, caches' bookkeeping or models (:mod:`opsd_core.kernels.attention` wraps
these kernels); inputs are contiguous.

Letters: H query heads, Hk KV heads, G = H / Hk query heads per KV head, S keys, d head width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_S = 64  # keys per inner step
_MAX_SPLITS = 64  # key chunks per KV head


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, acc_ptr, max_ptr, sum_ptr, S, scale,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    kv = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    group = tl.arange(0, GP)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + (kv * G + group)[:, None] * D + dims[None, :], mask=(group < G)[:, None], other=0.0)
    running_max = tl.full((GP,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((GP,), dtype=tl.float32)
    acc = tl.zeros((GP, D), dtype=tl.float32)
    head = kv.to(tl.int64) * S * D
    for offset in range(0, CHUNK, BLOCK_S):
        keys = split * CHUNK + offset + tl.arange(0, BLOCK_S)
        in_range = keys < S
        counted = in_range & (tl.load(valid_ptr + keys, mask=in_range, other=0) != 0)
        rows = head + keys[:, None] * D + dims[None, :]
        k = tl.load(k_ptr + rows, mask=in_range[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(counted[None, :], scores * scale, float("-inf"))  # (GP, BLOCK_S)
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no key counted yet: exp(-inf) = 0
        decay = tl.exp(running_max - shift)
        weights = tl.exp(scores - shift[:, None])
        running_sum = running_sum * decay + tl.sum(weights, axis=1)
        v = tl.load(v_ptr + rows, mask=in_range[:, None], other=0.0)
        if IEEE:
            acc = acc * decay[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * decay[:, None] + tl.dot(weights.to(v.dtype), v)
        running_max = new_max
    slot = kv * splits + split
    tl.store(acc_ptr + (slot * GP + group)[:, None] * D + dims[None, :], acc)
    tl.store(max_ptr + slot * GP + group, running_max)
    tl.store(sum_ptr + slot * GP + group, running_sum)


@triton.jit
def _combine_kernel(
    acc_ptr, max_ptr, sum_ptr, out_ptr, splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLITS_P: tl.constexpr,
):  # fmt: skip
    head = tl.program_id(0)
    kv = head // G
    member = head % G
    chunk = tl.arange(0, SPLITS_P)
    used = chunk < splits
    slots = (kv * splits + chunk) * GP + member
    maxima = tl.load(max_ptr + slots, mask=used, other=float("-inf"))
    sums = tl.load(sum_ptr + slots, mask=used, other=0.0)
    top = tl.max(maxima, axis=0)
    weights = tl.exp(maxima - tl.where(top == float("-inf"), 0.0, top))  # chunks with no key: 0
    dims = tl.arange(0, D)
    acc = tl.load(acc_ptr + slots[:, None] * D + dims[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(acc * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
    tl.store(out_ptr + head * D + dims, out.to(out_ptr.dtype.element_ty))


def one_query_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(H, d) attention of (H, d) ``q`` over (Hk, S, d) ``keys`` / ``values`` where bool (S,) ``valid``."""
    heads, width = q.shape
    kv_heads, length, _ = keys.shape
    group = heads // kv_heads
    blocks = triton.cdiv(length, _BLOCK_S)
    per_split = triton.cdiv(blocks, min(blocks, _MAX_SPLITS))
    splits = triton.cdiv(blocks, per_split)
    padded_group = max(16, triton.next_power_of_2(group))
    acc = torch.empty(kv_heads, splits, padded_group, width, device=q.device, dtype=torch.float32)
    maxima = torch.empty(kv_heads, splits, padded_group, device=q.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    _partial_kernel[(kv_heads, splits)](
        q, keys, values, valid, acc, maxima, sums, length, width**-0.5,
        G=group, GP=padded_group, D=width, CHUNK=per_split * _BLOCK_S, BLOCK_S=_BLOCK_S,
        IEEE=q.dtype == torch.float32, num_warps=4,
    )  # fmt: skip
    out = torch.empty_like(q)
    _combine_kernel[(heads,)](
        acc, maxima, sums, out, splits, G=group, GP=padded_group, D=width, SPLITS_P=triton.next_power_of_2(splits)
    )
    return out
