"""The tiny UMM: a decoder over word tokens and image-patch tokens.

Owns: the architecture (learned token and absolute position embeddings; one "ViT" patch per
grid cell, its pixels projected to the model width plus a learned 2-D patch-position
embedding, added to the ``<imgp>`` placeholder's embedding; pre-LN blocks whose attention is
causal plus bidirectional inside each image block; untied LM head) and a per-layer KV cache
for incremental decoding.
Does not know: training, tokenization, contexts or losses; it runs on one device and sees
only the tensors of :class:`ModelInputs`.

Letters: B batch, T positions of this call, S key positions (cached ones included), D model
width, H heads, V vocabulary, P pixels per patch (cell_pixels² · 3).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the tiny UMM (the defaults give 855,040 parameters with 52 tokens)."""

    vocab_size: int = 52
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    max_positions: int = 160
    grid_size: int = 5
    cell_pixels: int = 8

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    @property
    def patch_dim(self) -> int:
        return self.cell_pixels * self.cell_pixels * 3

    @property
    def patches_per_image(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def image_side(self) -> int:
        return self.grid_size * self.cell_pixels

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelInputs:
    """A batch of token rows.

    Attributes:
        tokens: int64 (B, T) token ids; image patches hold the ``<imgp>`` placeholder id.
        positions: int64 (B, T) position ids (left padding makes them differ from column ids).
        patches: float32 (B, T, P) pixels of the image patch at each position, 0 elsewhere.
        patch_cells: int64 (B, T) grid cell (row-major) of each image patch, -1 elsewhere.
        image_blocks: int64 (B, T) 1-based number of the image block (``<img>`` .. ``</img>``)
            holding each position, 0 outside images; positions of one block attend each other.
        valid: bool (B, T) False at padding, which no position attends.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    patches: torch.Tensor
    patch_cells: torch.Tensor
    image_blocks: torch.Tensor
    valid: torch.Tensor

    def to(self, device: torch.device | str) -> ModelInputs:
        return ModelInputs(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


class KVCache:
    """Per-layer keys and values of the positions seen so far, preallocated.

    ``keys[layer]`` / ``values[layer]``: float (B, H, capacity, D/H); ``valid``: bool
    (B, capacity), False at padding; ``length``: positions filled.
    """

    def __init__(self, batch: int, config: TinyConfig, capacity: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, config.n_heads, capacity, config.d_model // config.n_heads)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0


class Block(nn.Module):
    """Pre-LN transformer block: multi-head attention then a GELU MLP, both residual."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        width = config.d_model
        self.n_heads = config.n_heads
        self.norm_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.mlp_ratio * width), nn.GELU(), nn.Linear(config.mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        """float (B, T, D) -> float (B, T, D).

        Args:
            x: float (B, T, D) hidden states of this call's positions.
            allowed: bool (B, T, S) which keys each query attends (S = cached + T).
            cache: when given, this call's keys and values are appended at ``cache.length``.
            layer: index of this block's slot in ``cache``.
        """
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm_attention(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D/H)
        if cache is not None:
            end = cache.length + length
            cache.keys[layer][:, :, cache.length : end] = k
            cache.values[layer][:, :, cache.length : end] = v
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]  # (B, H, S, D/H)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))  # (B, H, T, D/H)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm_mlp(x))


class TinyUMM(nn.Module):
    """The tiny unified model's understanding path; its visual thought comes from the task as
    a stored image, so it has no image generator."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_positions, config.d_model)
        self.patch_projection = nn.Linear(config.patch_dim, config.d_model)
        self.patch_position = nn.Embedding(config.patches_per_image, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(_init_weights)

    def embed(self, inputs: ModelInputs) -> torch.Tensor:
        """float (B, T, D): token + position embeddings, plus the patch embedding at patches."""
        x = self.token_embedding(inputs.tokens) + self.position_embedding(inputs.positions)
        is_patch = (inputs.patch_cells >= 0).unsqueeze(-1)  # (B, T, 1)
        patch = self.patch_projection(inputs.patches) + self.patch_position(inputs.patch_cells.clamp(min=0))
        return x + patch * is_patch

    def forward(self, inputs: ModelInputs, cache: KVCache | None = None) -> torch.Tensor:
        """float (B, T, V) next-token logits at every position of ``inputs``.

        Without a cache the rows are attended as a whole. With one, ``inputs`` are the positions
        that follow the cached ones and are appended to it; an image block must then lie wholly
        inside one call (the prefill), since bidirectional attention does not reach the cache.
        """
        return self.lm_head(self.final_hidden(inputs, cache))

    def final_hidden(self, inputs: ModelInputs, cache: KVCache | None = None) -> torch.Tensor:
        """float (B, T, D) final-norm output at every position: what ``lm_head`` multiplies."""
        if cache is not None and cache.length + inputs.tokens.shape[1] > cache.capacity:
            raise ValueError(
                f"KV cache holds {cache.capacity} positions; {cache.length} used, {inputs.tokens.shape[1]} more asked"
            )
        past_valid = None if cache is None else cache.valid[:, : cache.length]
        allowed = attention_mask(inputs, past_valid)
        x = self.embed(inputs)
        for layer, block in enumerate(self.blocks):
            x = block(x, allowed, cache, layer)
        if cache is not None:
            cache.valid[:, cache.length : cache.length + inputs.tokens.shape[1]] = inputs.valid
            cache.length += inputs.tokens.shape[1]
        return self.norm(x)


def attention_mask(inputs: ModelInputs, past_valid: torch.Tensor | None) -> torch.Tensor:
    """bool (B, T, S): causal over valid keys plus every pair inside one image block.

    ``past_valid`` is bool (B, S - T), the cached keys (all earlier, so all visible when valid).
    """
    blocks = inputs.image_blocks
    batch, length = blocks.shape
    same_image = (blocks.unsqueeze(2) == blocks.unsqueeze(1)) & (blocks.unsqueeze(2) > 0)  # (B, T, T)
    causal = torch.ones(length, length, dtype=torch.bool, device=blocks.device).tril()
    allowed = (causal | same_image) & inputs.valid.unsqueeze(1)  # (B, T, T)
    # A padding query would attend nothing and give NaN; letting every query see itself keeps
    # it finite and changes no valid query (each already sees itself).
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=blocks.device)
    if past_valid is None:
        return allowed
    return torch.cat([past_valid.unsqueeze(1).expand(batch, length, -1), allowed], dim=2)  # (B, T, S)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
