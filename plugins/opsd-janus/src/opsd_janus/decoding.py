"""Model input and KV-cached decoding shared by Janus's text and image-token generation.

Owns: a rendered context (tokens, image slots, pixels), the state of a batch being decoded,
and the one step that appends embeddings at each row's next position.
Does not know: chat templates, tokenizers, image preprocessing or what the decoded tokens
mean; :mod:`opsd_janus.backend` renders contexts and decodes text, and
:mod:`opsd_janus.visual_thought` samples image tokens, both through :func:`step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opsd_core.api import DecodeState


@dataclass
class Rendered:
    """One context as model input.

    Attributes:
        tokens: token ids, image slots holding the placeholder id.
        image_slots: positions of the image slots, in order (image_tokens per image).
        images: float32 (3, S, S) normalised pixels of each image, in order.
    """

    tokens: list[int] = field(default_factory=list)
    image_slots: list[int] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)


class JanusDecodeState(DecodeState):
    """A batch being decoded.

    Attributes:
        logits: float (B, V) next-token logits.
        cache: transformers' DynamicCache of the prefilled rows and decoded tokens.
        attention: int64 (B, S), 1 where a cached column is a real token (0: padding).
        next_positions: int64 (B,) position id of each row's next token.
        capacity: columns the state may reach (prefill width + max_new_tokens).
    """

    def __init__(self, model, cache, attention: torch.Tensor, next_positions: torch.Tensor, logits: torch.Tensor, capacity: int):
        self.model, self.cache, self.attention = model, cache, attention
        self.next_positions, self.logits, self.capacity = next_positions, logits, capacity


def step(model, state: JanusDecodeState, embeds: torch.Tensor) -> torch.Tensor:
    """Append float (B, 1, D) ``embeds`` at each row's next position; return float (B, 1, D)
    hidden states. Shared by text decoding and image-token generation."""
    if state.attention.shape[1] >= state.capacity:
        raise RuntimeError(f"decoding state full: it was started with room for {state.capacity} columns")
    batch = embeds.shape[0]
    ones = torch.ones(batch, 1, dtype=state.attention.dtype, device=state.attention.device)
    state.attention = torch.cat([state.attention, ones], dim=1)  # (B, S + 1)
    output = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=state.attention,
        position_ids=state.next_positions.view(batch, 1),
        cache=state.cache,
        use_cache=True,
    )
    state.next_positions = state.next_positions + 1
    return output.last_hidden_state
