"""Running the model on packed rows: teacher forcing, cached prefill and decoding.

Owns: moving packed rows through embeddings and the decoder, with or without a KV cache, and
the bookkeeping of cached decoding (which cache slots are real, each row's next RoPE id).
Does not know: contexts, tokenizers, sampling policy or losses.
"""

from __future__ import annotations

import torch

from opsd_thinkmorph.model import Bagel, KVCache
from opsd_thinkmorph.packing import PackedRows


def forward_rows(model: Bagel, rows: PackedRows, cache: KVCache | None = None) -> torch.Tensor:
    """Final hidden states float (B, T, D) of ``rows`` (after ``cache``'s positions, if given)."""
    parameter = next(model.parameters())
    rows = rows.to(parameter.device)
    h = model.input_embeddings(rows.token_ids, rows.images, rows.image_slots, rows.latents, rows.latent_slots)
    mask = rows.mask
    if cache is not None:
        start = cache.length
        if not cache.layers[0].frozen:
            cache.valid[:, start : start + rows.valid.shape[1]] = rows.valid
        mask = torch.cat([cache.valid[:, :start].unsqueeze(1).expand(-1, mask.shape[1], -1), mask], dim=2)
    return model.llm_forward(h, rows.positions, mask, rows.gen, cache)
