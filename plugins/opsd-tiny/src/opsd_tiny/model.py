"""The tiny UMM: a decoder over word tokens and image-patch tokens.

Owns: the architecture (learned token, position and 2-D patch-position embeddings; one
"ViT" patch per grid cell projected into the model width; pre-LN blocks with causal attention
plus bidirectional attention inside each image block; untied LM head) and a per-layer KV
cache for incremental decoding.
Does not know: training, tokenization, contexts or losses; it is single-device.

Letters: B batch, T positions, S cached positions, D model width, H heads, V vocabulary,
P pixels per patch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the tiny UMM."""

    vocab_size: int
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    max_positions: int = 160
    grid_cells: int = 25
    patch_dim: int = 8 * 8 * 3

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelInputs:
    """A batch of sequences.

    Attributes:
        tokens: int64 (B, T) token ids (image patches hold the patch placeholder id).
        positions: int64 (B, T) position ids.
        patches: float32 (B, T, P) pixels of the image patch at each position (0 elsewhere).
        patch_cells: int64 (B, T) grid cell of each patch (0 elsewhere).
        image_blocks: int64 (B, T) image block number of each position, 0 outside images.
        valid: bool (B, T) False at padding.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    patches: torch.Tensor
    patch_cells: torch.Tensor
    image_blocks: torch.Tensor
    valid: torch.Tensor


class KVCache:
    """Per-layer keys and values, preallocated for ``capacity`` positions.

    ``keys[layer]`` and ``values[layer]`` are float (B, H, capacity, D/H); ``valid`` is bool
    (B, capacity); ``length`` is the number of filled positions.
    """

    def __init__(self, batch: int, config: TinyConfig, capacity: int, device, dtype):
        head_dim = config.d_model // config.n_heads
        shape = (batch, config.n_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0


class Block(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        width = config.d_model
        self.n_heads = config.n_heads
        self.norm_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, config.mlp_ratio * width), nn.GELU(), nn.Linear(config.mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        """x: float (B, T, D); allowed: bool (B, T, S) keys each query may see."""
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm_attention(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D/H)
        if cache is not None:
            end = cache.length + length
            cache.keys[layer][:, :, cache.length : end] = k
            cache.values[layer][:, :, cache.length : end] = v
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]  # (B, H, S, D/H)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm_mlp(x))


class TinyUMM(nn.Module):
    """The ~0.86M-parameter tiny unified model (understanding path only; its "visual thought"
    comes from the task, as a stored image)."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_positions, config.d_model)
        self.patch_projection = nn.Linear(config.patch_dim, config.d_model)
        self.patch_position = nn.Embedding(config.grid_cells, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(_init)

    def embed(self, inputs: ModelInputs) -> torch.Tensor:
        """float (B, T, D) input embeddings."""
        x = self.token_embedding(inputs.tokens) + self.position_embedding(inputs.positions)
        is_patch = (inputs.image_blocks > 0).unsqueeze(-1)
        image = self.patch_projection(inputs.patches) + self.patch_position(inputs.patch_cells)
        return x + torch.where(is_patch, image, torch.zeros_like(image))

    def forward(self, inputs: ModelInputs, cache: KVCache | None = None) -> torch.Tensor:
        """float (B, T, V) logits at every position of ``inputs``.

        Without a cache the sequences are attended as a whole; with one, ``inputs`` are the
        next positions after the cached ones (their image blocks may not reach back into it).
        """
        x = self.embed(inputs)
        allowed = self._allowed(inputs, cache)
        for layer, block in enumerate(self.blocks):
            x = block(x, allowed, cache, layer)
        if cache is not None:
            cache.length += inputs.tokens.shape[1]
        return self.lm_head(self.norm(x))

    @staticmethod
    def _allowed(inputs: ModelInputs, cache: KVCache | None) -> torch.Tensor:
        """bool (B, T, S): causal over valid keys, plus every pair inside one image block."""
        batch, length = inputs.tokens.shape
        blocks = inputs.image_blocks
        same_block = (blocks.unsqueeze(2) == blocks.unsqueeze(1)) & (blocks.unsqueeze(2) > 0)  # (B, T, T)
        causal = torch.ones(length, length, dtype=torch.bool, device=blocks.device).tril()
        allowed = (causal | same_block) & inputs.valid.unsqueeze(1)  # (B, T, T)
        if cache is not None:
            cache.valid[:, cache.length : cache.length + length] = inputs.valid
            past = cache.valid[:, : cache.length].unsqueeze(1).expand(batch, length, cache.length)  # (B, T, S_past)
            allowed = torch.cat([past, allowed], dim=2)  # (B, T, S)
        # A query at padding would see no key; let it see itself so softmax stays finite.
        eye = torch.eye(length, dtype=torch.bool, device=blocks.device).unsqueeze(0)
        own = torch.cat([torch.zeros(batch, length, allowed.shape[2] - length, dtype=torch.bool, device=blocks.device),
                         eye.expand(batch, -1, -1)], dim=2)
        return allowed | own


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
