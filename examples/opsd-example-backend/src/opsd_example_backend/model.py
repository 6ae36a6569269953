"""The byte-level UMM: a small causal transformer over byte tokens and image-patch tokens.

Owns: the architecture (token and learned absolute position embeddings; each image patch's
pixels projected to the model width and added to the ``<patch>`` placeholder's embedding;
pre-LN blocks with causal attention; untied LM head), seeded initialisation and a per-layer
KV cache for incremental decoding.
Does not know: tokenization, contexts, losses or training; it runs on one device and sees
only the tensors of :class:`ModelInputs`.

Letters: B batch, T positions of this call, S key positions (cached ones included), D model
width, H heads, V vocabulary, P pixels per patch (3 · patch_size²).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opsd_example_backend.vocab import IMAGE_PATCH, VOCAB_SIZE


@dataclass(frozen=True)
class ByteUMMConfig:
    """Architecture of the byte-level UMM (stored as ``config.json`` next to the weights)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_positions: int = 1024
    image_size: int = 16
    patch_size: int = 4
    vocab_size: int = VOCAB_SIZE

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size

    @property
    def patches_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelInputs:
    """A batch of token rows.

    Attributes:
        tokens: int64 (B, T) token ids; image patches hold the ``<patch>`` placeholder id.
        positions: int64 (B, T) position ids, counted along each row's real tokens.
        patches: float (B, T, P) pixels of the image patch at each position, 0 elsewhere.
        valid: bool (B, T) False at padding, which no position attends.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    patches: torch.Tensor
    valid: torch.Tensor


class KVCache:
    """Keys and values of the positions seen so far, preallocated for ``capacity`` positions.

    ``keys[layer]`` / ``values[layer]``: float (B, H, capacity, D/H); ``valid``: bool
    (B, capacity), False at padding; ``length``: positions filled.
    """

    def __init__(self, batch: int, config: ByteUMMConfig, capacity: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, config.n_heads, capacity, config.d_model // config.n_heads)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.capacity = capacity
        self.length = 0


class Block(nn.Module):
    """Pre-LN transformer block: causal self-attention, then a GELU MLP, both residual."""

    def __init__(self, config: ByteUMMConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.projection = nn.Linear(config.d_model, config.d_model)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model), nn.GELU(), nn.Linear(4 * config.d_model, config.d_model)
        )

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        """float (B, T, D) -> float (B, T, D).

        Args:
            x: float (B, T, D) hidden states of this call's positions.
            allowed: bool (B, T, S) the keys each query may attend.
            cache: when given, this call's keys and values are written at ``cache.length``.
            layer: this block's index in ``cache``.
        """
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D/H)
        if cache is not None:
            end = cache.length + length
            cache.keys[layer][:, :, cache.length : end] = k
            cache.values[layer][:, :, cache.length : end] = v
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]  # (B, H, S, D/H)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1))  # (B, H, T, D/H)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.mlp_norm(x))


class ByteUMM(nn.Module):
    """The understanding path of a unified model; it draws no images, so its visual thoughts
    come from the task."""

    def __init__(self, config: ByteUMMConfig, seed: int = 0):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.max_positions, config.d_model)
        self.patch_projection = nn.Linear(config.patch_dim, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Seeded weights: N(0, 0.02) matrices and embeddings, zero biases, unit norms; the
        same seed gives the same model whatever torch's global RNG holds."""
        generator = torch.Generator().manual_seed(seed)
        for name, parameter in self.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)

    def forward(self, inputs: ModelInputs, cache: KVCache | None = None) -> torch.Tensor:
        """float (B, T, V) next-token logits at every position of ``inputs``.

        With a cache, ``inputs`` are the positions that follow the cached ones and are
        appended to it.
        """
        length = inputs.tokens.shape[1]
        if cache is not None and cache.length + length > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} positions; {cache.length} used, {length} more asked")
        is_patch = (inputs.tokens == IMAGE_PATCH).unsqueeze(-1)  # (B, T, 1)
        x = self.token_embedding(inputs.tokens) + self.position_embedding(inputs.positions)
        x = x + self.patch_projection(inputs.patches) * is_patch  # (B, T, D)
        past_valid = None if cache is None else cache.valid[:, : cache.length]
        allowed = causal_mask(inputs.valid, past_valid)
        for layer, block in enumerate(self.blocks):
            x = block(x, allowed, cache, layer)
        if cache is not None:
            cache.valid[:, cache.length : cache.length + length] = inputs.valid
            cache.length += length
        return self.lm_head(self.norm(x))


def causal_mask(valid: torch.Tensor, past_valid: torch.Tensor | None) -> torch.Tensor:
    """bool (B, T, S): each query sees the valid keys up to itself.

    Args:
        valid: bool (B, T) the real positions of this call.
        past_valid: bool (B, S - T) the cached positions (all earlier), or None.
    """
    batch, length = valid.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    # A padding query would see no key and give NaN; letting every query see itself keeps it
    # finite and changes no real query, which sees itself already.
    allowed = causal & valid.unsqueeze(1) | torch.eye(length, dtype=torch.bool, device=valid.device)  # (B, T, T)
    if past_valid is None:
        return allowed
    return torch.cat([past_valid.unsqueeze(1).expand(batch, length, -1), allowed], dim=2)  # (B, T, S)
