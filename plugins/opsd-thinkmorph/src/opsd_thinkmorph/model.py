"""BAGEL-7B-MoT on plain torch: the Qwen2.5 mixture-of-transformers LLM, the SigLIP NaViT, the
connector and the generation embeddings/heads.

Owns: the modules (named so that the official state-dict keys load as they are), one LLM
forward over a batch of rows that serves teacher forcing, cached prefill, decoding and
flow-velocity queries alike, and the embedding of ViT patches and latent tokens.
Does not know: tokenizers, contexts, packing rules, the VAE, losses or parallelism; the
attention mask and RoPE positions arrive ready-made (see :mod:`opsd_thinkmorph.packing`).

Shapes: B rows, T query positions, S key positions (cache + query), D LLM width, Dv ViT width,
H query heads, Hk KV heads, d head width, N ViT patches, M latent tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from opsd_core.api import kernels
from opsd_thinkmorph.architecture import BagelConfig, LLMConfig, ViTConfig


# ---------------------------------------------------------------------------------------------- blocks
class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel where torch has one (CUDA): a decode step runs 4 norms per layer.
        normalised = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normalised.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple:
    """cos, sin of shape (*positions.shape, d) for the rotate-half convention, computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., d)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, d) ``x`` by (B, T, d) tables."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


# cuDNN's fused attention rebuilds its plan for every new key length, which costs milliseconds
# of host time per call: ruinous for cached decoding (a few queries per call), worth it for long
# packs, where it is the fastest kernel. Short query blocks use the memory-efficient kernel.
_CUDA_ATTENTION = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
_SHORT_QUERIES = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention of (B, H, T, d) queries over (B, Hk, S, d) keys/values; bool (B, 1, T, S) mask.

    Query head h reads KV head h // (H / Hk) (grouped-query attention).
    """
    if not q.is_cuda or q.shape[2] >= _SHORT_QUERIES:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with sdpa_kernel(_CUDA_ATTENTION):
        return grouped_query_attention(q, k, v, mask)


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`attention` for short query blocks without copying keys and values per query head.

    The G = H / Hk query heads that share a KV head become G blocks of queries of that KV head:
    queries (B, Hk, G*T, d) over the (B, Hk, S, d) keys as they are, the mask repeated per
    block. Every query row still has its own softmax, so this is the same attention; what it
    saves is writing (and reading) G copies of the cache per step, which dominates batched
    decoding over long contexts.
    """
    batch, heads, length, width = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    queries = q.reshape(batch, kv_heads, group * length, width)  # head h = kv * G + g
    blocks = mask.unsqueeze(2).expand(batch, 1, group, length, mask.shape[-1]).reshape(batch, 1, group * length, -1)
    if length <= _DECODE_QUERIES and batch <= _DECODE_ROWS:
        out = _few_query_attention(queries, k, v, blocks)
    else:
        out = F.scaled_dot_product_attention(queries, k, v, attn_mask=blocks)
    return out.reshape(batch, heads, length, width)


# Decode steps of a few rows (a query or a few per row) attend with two batched matmuls and a
# float32 softmax: the fused kernel tiles 64 or more queries per block and spends most of a
# small decode step's attention on empty tiles (measured on an H200 with 1.7k keys: 72 us per
# layer at batch 1; the whole step 9.3 ms fused, 7.9 ms written out). From batch 16 on the
# fused kernel wins (10.4 against 11.5 ms per step; 11.4 against 18.4 ms at batch 64).
_DECODE_QUERIES = 4
_DECODE_ROWS = 4


def _few_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, H, Q, d) queries over (B, H, S, d) keys/values, bool (B, 1, Q, S)
    mask, written out: scores in the inputs' dtype (float32 accumulation), softmax in float32 (or
    float64 for float64 inputs)."""
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Routing:
    """Which rows of a (B, T, ...) tensor go to the understanding module or its ``_moe_gen`` twin.

    Built once per forward from a bool (B, T) mask of generation (VAE latent) positions, so the
    per-module dispatch needs no host synchronisation.
    """

    def __init__(self, gen: torch.Tensor):
        flat = gen.flatten()
        self.gen_index = flat.nonzero().squeeze(1)  # (M,)
        self.und_index = (~flat).nonzero().squeeze(1)  # (B*T - M,)
        self.count = flat.numel()

    @staticmethod
    def route(und: nn.Module, twin: nn.Module | None, x: torch.Tensor, routing: Routing | None, out: int):
        """``und(x)`` where ``routing`` is None, else each row through its expert."""
        if routing is None:
            return und(x)
        leading, middle = x.shape[:2], x.shape[2:-1]
        flat = x.reshape(routing.count, *x.shape[2:])
        und_rows = und(flat.index_select(0, routing.und_index))
        gen_rows = twin(flat.index_select(0, routing.gen_index))
        result = flat.new_empty(routing.count, *middle, out)
        result = result.index_copy(0, routing.und_index, und_rows).index_copy(0, routing.gen_index, gen_rows)
        return result.view(*leading, *middle, out)


class MoTAttention(nn.Module):
    """Joint attention over und and gen positions with per-expert projections and QK-norm."""

    def __init__(self, config: LLMConfig, with_gen: bool):
        super().__init__()
        D, H, Hk, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hk, d
        self.q_proj = nn.Linear(D, H * d)
        self.k_proj = nn.Linear(D, Hk * d)
        self.v_proj = nn.Linear(D, Hk * d)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        if with_gen:
            self.q_proj_moe_gen = nn.Linear(D, H * d)
            self.k_proj_moe_gen = nn.Linear(D, Hk * d)
            self.v_proj_moe_gen = nn.Linear(D, Hk * d)
            self.o_proj_moe_gen = nn.Linear(H * d, D, bias=False)
            self.q_norm_moe_gen = RMSNorm(d, config.rms_norm_eps)
            self.k_norm_moe_gen = RMSNorm(d, config.rms_norm_eps)

    def _project(self, name: str, x: torch.Tensor, gen: Routing | None, heads: int) -> torch.Tensor:
        """(B, T, heads, d) projection, RMS-normalised for q and k."""
        twin = getattr(self, f"{name}_proj_moe_gen", None) if gen is not None else None
        y = Routing.route(getattr(self, f"{name}_proj"), twin, x, gen, heads * self.head_dim)
        y = y.view(*x.shape[:-1], heads, self.head_dim)  # (B, T, heads, d)
        if name == "v":
            return y
        norm_twin = getattr(self, f"{name}_norm_moe_gen", None) if gen is not None else None
        return Routing.route(getattr(self, f"{name}_norm"), norm_twin, y, gen, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        gen: Routing | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: LayerCache | None,
    ) -> torch.Tensor:
        """(B, T, D) ``x`` -> (B, T, D); ``mask`` bool (B, T, S) over cache + query keys."""
        q = self._project("q", x, gen, self.num_heads)
        k = self._project("k", x, gen, self.num_kv_heads)
        v = self._project("v", x, gen, self.num_kv_heads)
        out = self.attend(q, k, v, rope, mask, cache)
        twin = self.o_proj_moe_gen if gen is not None else None
        return Routing.route(self.o_proj, twin, out, gen, x.shape[-1])

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: LayerCache | None,
        one_query: bool = False,
    ) -> torch.Tensor:
        """(B, T, H*d) attention outputs of (B, T, H / Hk / Hk, d) projections (q and k normalised).

        ``one_query`` (B = T = 1 only): attend with :func:`opsd_core.api.kernels.one_query_attention`.
        """
        B, T = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, Hk, S, d)
        if one_query:
            out = kernels.one_query_attention(q.reshape(self.num_heads, -1), k[0], v[0], mask.reshape(-1))  # (H, d)
            return out.view(1, 1, -1)
        out = attention(q, k, v, mask.unsqueeze(1))
        return out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*d)


class MoTDecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, with_gen: bool):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = MoTAttention(config, with_gen)
        self.mlp = SwiGLU(D, config.intermediate_size)
        self.input_layernorm = RMSNorm(D, eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        if with_gen:
            self.mlp_moe_gen = SwiGLU(D, config.intermediate_size)
            self.input_layernorm_moe_gen = RMSNorm(D, eps)
            self.post_attention_layernorm_moe_gen = RMSNorm(D, eps)

    def forward(self, h, gen, rope, mask, cache=None):
        D = h.shape[-1]
        twin = (lambda name: getattr(self, f"{name}_moe_gen")) if gen is not None else (lambda name: None)
        normed = Routing.route(self.input_layernorm, twin("input_layernorm"), h, gen, D)
        h = h + self.self_attn(normed, gen, rope, mask, cache)
        normed = Routing.route(self.post_attention_layernorm, twin("post_attention_layernorm"), h, gen, D)
        return h + Routing.route(self.mlp, twin("mlp"), normed, gen, D)


def call_layer(layer: MoTDecoderLayer, h, routing, rope, mask, cache):
    """``layer(h, routing, rope, mask, cache)``: the default ``run_layer`` of :meth:`Bagel.llm_forward`."""
    return layer(h, routing, rope, mask, cache)


def one_row_layer(layer: MoTDecoderLayer, h, routing, rope, mask, cache):
    """:func:`call_layer` for a step of one row and one position through the understanding
    expert, in four weight passes (:func:`~opsd_core.api.kernels.row_linear`,
    :func:`~opsd_core.api.kernels.row_swiglu`): q, k and v; o with the residual; gate, up and
    SwiGLU; down with the residual; attention over the cache by
    :func:`~opsd_core.api.kernels.one_query_attention`. Other steps go to :func:`call_layer`.
    The arithmetic is the layer's, rounded where the layer rounds; what changes is that each
    weight is read once, in few launches.
    """
    if routing is not None or h.shape[0] * h.shape[1] != 1:
        return call_layer(layer, h, routing, rope, mask, cache)
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv_heads, width = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = kernels.row_linear(
        layer.input_layernorm(h),
        [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
        [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias],
    )
    q, k, v = qkv.view(1, 1, heads + 2 * kv_heads, width).split([heads, kv_heads, kv_heads], dim=2)
    out = attn.attend(attn.q_norm(q), attn.k_norm(k), v, rope, mask, cache, one_query=True)  # (1, 1, H*d)
    row = kernels.row_linear(out, [attn.o_proj.weight], residual=h.reshape(-1))  # (D,)
    activated = kernels.row_swiglu(layer.post_attention_layernorm(row), mlp.gate_proj.weight, mlp.up_proj.weight)
    return kernels.row_linear(activated, [mlp.down_proj.weight], residual=row).view_as(h)


class Qwen2MoTModel(nn.Module):
    def __init__(self, config: LLMConfig, with_gen: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(config, with_gen) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if with_gen:
            self.norm_moe_gen = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen2MoTForCausalLM(nn.Module):
    def __init__(self, config: LLMConfig, with_gen: bool):
        super().__init__()
        self.config = config
        self.model = Qwen2MoTModel(config, with_gen)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


# ---------------------------------------------------------------------------------------------- KV cache
class LayerCache:
    """One layer's keys and values of B rows, preallocated to ``capacity`` positions.

    Rows share a length (rows are padded to a common width by the caller); ``frozen`` caches
    answer queries without storing them (flow-velocity queries against a context).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # (B, Hk, capacity, d)
        self.length = 0
        self.frozen = False
        # Fixed-shape decoding: one new position written at this int64 (1,) device index, and
        # the whole buffer returned (the caller masks unwritten slots), so no shape depends on
        # the length and the step can be captured in a CUDA graph.
        self.slot: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slot is not None:
            self.keys.index_copy_(2, self.slot, k)
            self.values.index_copy_(2, self.slot, v)
            return self.keys, self.values
        end = self.length + k.shape[2]
        if self.frozen:
            return (
                torch.cat([self.keys[:, :, : self.length], k], dim=2),
                torch.cat([self.values[:, :, : self.length], v], dim=2),
            )
        if end > self.keys.shape[2]:
            raise RuntimeError(f"KV cache full: {end} positions needed, {self.keys.shape[2]} allocated")
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """Per-layer caches plus which cached slots are real (not padding) for each row."""

    def __init__(self, config: LLMConfig, batch: int, capacity: int, device, dtype):
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        # Zeros, not empty: fixed-shape steps read unwritten slots (masked), and garbage there could
        # be NaN, which a mask cannot cancel.
        self.layers = [
            LayerCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(config.num_layers)
        ]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # (B, capacity)
        self.capacity = capacity

    @property
    def length(self) -> int:
        return self.layers[0].length

    def set_frozen(self, frozen: bool) -> None:
        for layer in self.layers:
            layer.frozen = frozen

    def select(self, rows: torch.Tensor) -> KVCache:
        """A copy holding only ``rows`` (int64 (B',)), e.g. one context repeated per sample."""
        copy = KVCache.__new__(KVCache)
        copy.layers = []
        for layer in self.layers:
            new = LayerCache(layer.keys[rows].clone(), layer.values[rows].clone())
            new.length, new.frozen = layer.length, layer.frozen
            copy.layers.append(new)
        copy.valid, copy.capacity = self.valid[rows].clone(), self.capacity
        return copy


# ---------------------------------------------------------------------------------------------- vision
class SiglipAttention(nn.Module):
    """Per-image attention over the patches of several images, with SDPA one image at a time or,
    with ``flash = True``, one ``flash_attn.flash_attn_varlen_func`` call for all of them."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        Dv = config.hidden_size
        self.num_heads = config.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(Dv, Dv), nn.Linear(Dv, Dv), nn.Linear(Dv, Dv)
        self.out_proj = nn.Linear(Dv, Dv)
        self.flash = False

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """(N, Dv) patches of several images -> (N, Dv); each image attends only to itself."""
        N, Dv = x.shape
        if self.flash:
            return self.out_proj(self._flash(x, seqlens).reshape(N, Dv))
        heads = lambda t: t.view(N, self.num_heads, -1).transpose(0, 1)  # noqa: E731  (H, N, d)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        outputs, start = [], 0
        with sdpa_kernel(_CUDA_ATTENTION) if x.is_cuda else contextlib.nullcontext():
            for length in seqlens:
                end = start + length
                outputs.append(F.scaled_dot_product_attention(q[:, start:end], k[:, start:end], v[:, start:end]))
                start = end
        out = torch.cat(outputs, dim=1).transpose(0, 1).reshape(N, Dv)
        return self.out_proj(out)

    def _flash(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """(N, H, d) outputs from flash-attn's variable-length kernel: q, k, v packed as (N, H, d),
        image i spanning rows cu[i]:cu[i + 1], no causal mask, the default 1/sqrt(d) scale."""
        from flash_attn import flash_attn_varlen_func

        N = x.shape[0]
        q, k, v = (proj(x).view(N, self.num_heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        lengths = torch.tensor(seqlens, dtype=torch.int32, device=x.device)
        cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (images + 1,)
        longest = max(seqlens)
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=False)


class SiglipMLP(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipLayer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.self_attn = SiglipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x, seqlens):
        x = x + self.self_attn(self.layer_norm1(x), seqlens)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        # Stored as a Linear over (kh, kw, c)-ordered patch features, as in the released files.
        self.patch_embedding = nn.Linear(config.patch_dim, config.hidden_size)
        self.position_embedding = nn.Embedding(config.patches_per_side**2, config.hidden_size)


class SiglipEncoder(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(config) for _ in range(config.num_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """(N, P) patch pixels, int64 (N,) position ids r*side + c -> (N, Dv)."""
        x = self.embeddings.patch_embedding(patches) + self.embeddings.position_embedding(position_ids)
        for layer in self.encoder.layers:
            x = layer(x, seqlens)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(config)


class MLPConnector(nn.Module):
    def __init__(self, in_width: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(in_width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (1 = noise) -> (M, D): cos-first 256-d features, then a SiLU MLP."""

    FEATURES = 256

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.FEATURES, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.FEATURES // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float().unsqueeze(-1) * freqs  # (M, 128)
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """float32 (grid*grid, width): row r*grid + c = [E(c), E(r)], E(p) = [sin(p w), cos(p w)].

    The frozen table BAGEL adds to connector outputs (grid 70) and latent tokens (grid 64);
    computed here, never loaded from a checkpoint.
    """
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (width/4,)
    coords = torch.arange(grid, dtype=torch.float64)

    def embed(p: torch.Tensor) -> torch.Tensor:
        angles = p.unsqueeze(-1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (n, width/2)

    rows = coords.repeat_interleave(grid)  # r of index r*grid + c
    cols = coords.repeat(grid)
    return torch.cat([embed(cols), embed(rows)], dim=-1).float()


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class ImageInputs:
    """ViT inputs of all images of a batch, concatenated.

    Attributes:
        patches: float (N, P) patch pixels, features ordered (kh, kw, c), P = 14*14*3.
        position_ids: int64 (N,) r*70 + c.
        seqlens: patches per image.
    """

    patches: torch.Tensor
    position_ids: torch.Tensor
    seqlens: list[int]


@dataclass
class LatentInputs:
    """Latent tokens of all VAE blocks of a batch.

    Attributes:
        tokens: float (M, 64) x_t of each latent token (x_0 for clean blocks).
        timesteps: float (M,) t in [0, 1] (0 = clean).
        position_ids: int64 (M,) r*64 + c.
    """

    tokens: torch.Tensor
    timesteps: torch.Tensor
    position_ids: torch.Tensor


class Bagel(nn.Module):
    """The whole model. ``config.visual_gen`` decides whether the generation modules exist."""

    def __init__(self, config: BagelConfig):
        super().__init__()
        self.config = config
        llm, vit = config.llm, config.vit
        # The MoT twins are part of the LLM in every official build; visual_gen only adds the
        # latent embedding and velocity head.
        self.language_model = Qwen2MoTForCausalLM(llm, with_gen=True)
        self.vit_model = SiglipVisionModel(vit)
        self.connector = MLPConnector(vit.hidden_size, llm.hidden_size)
        self.register_buffer(
            "vit_pos_table", sincos_2d(config.vit_max_patches_per_side, llm.hidden_size), persistent=False
        )
        if config.visual_gen:
            self.time_embedder = TimestepEmbedder(llm.hidden_size)
            self.vae2llm = nn.Linear(config.latent_token_dim, llm.hidden_size)
            self.llm2vae = nn.Linear(llm.hidden_size, config.latent_token_dim)
            self.register_buffer(
                "latent_pos_table", sincos_2d(config.max_latent_size, llm.hidden_size), persistent=False
            )

    # -------------------------------------------------------------- embeddings
    def embed_images(self, images: ImageInputs) -> torch.Tensor:
        """(N, D) LLM inputs of ViT patches: connector(ViT) + the 70x70 sin-cos table."""
        dtype = self.connector.fc1.weight.dtype
        vit = self.vit_model.vision_model(images.patches.to(dtype), images.position_ids, images.seqlens)
        return self.connector(vit) + self.vit_pos_table[images.position_ids].to(dtype)

    def embed_latents(self, latents: LatentInputs) -> torch.Tensor:
        """(M, D) LLM inputs of latent tokens: vae2llm(x_t) + time embedding + 64x64 sin-cos table."""
        if not self.config.visual_gen:
            raise RuntimeError("this model was built without the generation modules (visual_gen=False)")
        dtype = self.vae2llm.weight.dtype
        return (
            self.vae2llm(latents.tokens.to(dtype))
            + self.time_embedder(latents.timesteps)
            + self.latent_pos_table[latents.position_ids].to(dtype)
        )

    def input_embeddings(
        self,
        token_ids: torch.Tensor,
        images: ImageInputs | None = None,
        image_slots: torch.Tensor | None = None,
        latents: LatentInputs | None = None,
        latent_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, D) inputs: token embeddings, with ViT and latent embeddings written at their slots.

        ``token_ids`` int64 (B, T) (any id at image/latent slots); ``image_slots`` / ``latent_slots``
        bool (B, T) masks whose True positions, in row-major order, receive the N / M embeddings.
        """
        h = self.language_model.model.embed_tokens(token_ids)  # (B, T, D)
        if images is not None and images.patches.shape[0]:
            h = h.masked_scatter(image_slots.unsqueeze(-1), self.embed_images(images).to(h.dtype))
        if latents is not None and latents.tokens.shape[0]:
            h = h.masked_scatter(latent_slots.unsqueeze(-1), self.embed_latents(latents).to(h.dtype))
        return h

    # -------------------------------------------------------------- the LLM
    def llm_forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        gen: torch.Tensor | None = None,
        cache: KVCache | None = None,
        run_layer: Callable | None = None,
    ) -> torch.Tensor:
        """Run the decoder. Returns the final hidden states (B, T, D), normalised per expert.

        Args:
            h: float (B, T, D) input embeddings.
            positions: int64 (B, T) RoPE ids (an image block shares one id).
            mask: bool (B, T, S) True where query t may attend key s; S = cache.length + T.
            gen: bool (B, T) generation-expert positions, or None when there are none.
            cache: keys/values of earlier positions; extended unless frozen.
            run_layer: ``run_layer(layer, h, routing, rope, mask, layer_cache)`` in place of
                ``layer(h, routing, rope, mask, layer_cache)`` (e.g. a compiled call).
        """
        llm = self.language_model
        routing = Routing(gen) if gen is not None and bool(gen.any()) else None
        rope = rope_tables(positions, llm.config.head_dim, llm.config.rope_theta, h.dtype)
        run_layer = run_layer or call_layer
        for index, layer in enumerate(llm.model.layers):
            h = run_layer(layer, h, routing, rope, mask, None if cache is None else cache.layers[index])
        twin = llm.model.norm_moe_gen if routing is not None else None
        return Routing.route(llm.model.norm, twin, h, routing, h.shape[-1])

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., 64) predicted flow velocity (noise - x0) from final hidden states of latent slots."""
        return self.llm2vae(hidden)
