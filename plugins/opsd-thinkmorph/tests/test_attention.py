"""Grouped-query attention for short query blocks equals attention over repeated KV heads, on
both of its paths (written out for decode steps of a few rows, fused SDPA otherwise)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opsd_thinkmorph.model import attention, grouped_query_attention


@pytest.mark.parametrize(
    "batch,heads,kv_heads,queries,keys",
    [(3, 28, 4, 1, 37), (2, 8, 2, 5, 20), (1, 4, 4, 3, 9), (4, 6, 1, 2, 11), (6, 8, 2, 1, 13)],
)
def test_grouped_query_attention_equals_repeated_heads(batch, heads, kv_heads, queries, keys):
    generator = torch.Generator().manual_seed(batch * 100 + heads)
    q = torch.randn(batch, heads, queries, 16, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, keys, 16, generator=generator, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, keys, 16, generator=generator, dtype=torch.float64)
    mask = torch.rand(batch, 1, queries, keys, generator=generator) > 0.4
    mask[..., 0] = True  # every query sees at least one key
    group = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), attn_mask=mask
    )
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(attention(q, k, v, mask), expected, rtol=0, atol=1e-12)
    # A query head reads its own KV head: changing KV head 0 moves only query heads 0..G-1.
    k2 = k.clone()
    k2[:, 0] += torch.randn(k2[:, 0].shape, generator=generator, dtype=torch.float64)
    moved = (grouped_query_attention(q, k2, v, mask) - expected).abs().amax(dim=(0, 2, 3)) > 1e-9
    assert moved.tolist() == [h < group for h in range(heads)]
