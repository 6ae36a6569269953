"""Drawing visual thoughts with Emu3's own image path: image tokens sampled, then VQ-decoded.

Owns: the conditional prompt of a problem (its student context, then the image header
``<|image start|>{h}*{w}<|image token|>``) and the unconditional one (BOS, the negative prompt,
the same header), classifier-free guidance on their log-probabilities, the position rule that
only visual tokens are sampled and an end-of-line token closes every row (what transformers'
``prefix_allowed_tokens_fn`` does for Emu3's ``generate``), temperature and top-k, and decoding
the code grid to PIL images.
Does not know: how the context is laid out (the backend renders it) or the VQ-VAE's internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_core.api import Problem


@torch.no_grad()
def draw_visual_thoughts(backend, model, problems: Sequence[Problem], generator: torch.Generator | None) -> list:
    """One PIL image per problem, ``rows * f`` by ``columns * f`` pixels for ``params.vt_grid``."""
    params, ids = backend.params, backend.ids
    rows, columns = params.vt_grid
    header = backend.image_header(rows, columns)
    builder = backend.context_builder()
    prompts = [backend.render(model, builder.student_context(problem)) + header for problem in problems]
    guided = params.vt_guidance_scale > 1.0
    if guided:
        negative = [ids["bos"], *backend.encode(params.vt_negative_prompt), *header]
        prompts += [negative] * len(problems)
    state = backend.prefill(model, prompts, rows * (columns + 1))
    batch = len(problems)
    visual = torch.zeros(backend.vocabulary.size, dtype=torch.bool)
    visual[backend.code_to_token] = True
    codes = torch.empty(batch, rows, columns, dtype=torch.long)
    logits = state.logits
    for step in range(rows * (columns + 1)):
        row, column = divmod(step, columns + 1)
        if column == columns:
            token = torch.full((batch,), ids["end_of_line"], dtype=torch.long)
        else:
            scores = _guided_scores(logits.float().cpu(), batch, params.vt_guidance_scale if guided else None)  # (B, V)
            token = _sample(scores.masked_fill(~visual, float("-inf")), params.vt_temperature, params.vt_top_k, generator)
            codes[:, row, column] = _token_to_code(backend, token)
        if step + 1 < rows * (columns + 1):
            logits = backend.decode_step(state, torch.cat([token, token]) if guided else token)
    vq = model.model.vqmodel
    was_training = vq.training
    vq.eval()  # as at inference: the decoder's BatchNorm layers use and keep their running statistics
    try:
        pixels = vq.decode(codes.to(next(vq.parameters()).device))  # (B, 3, H, W)
    finally:
        vq.train(was_training)
    return backend.transform.to_pil(pixels)


def _guided_scores(logits: torch.Tensor, batch: int, scale: float | None) -> torch.Tensor:
    """float (B, V) log-probabilities, guided by the unconditional rows (the second half of float (2B, V) ``logits``)."""
    scores = logits.log_softmax(dim=-1)
    if scale is None:
        return scores
    conditional, unconditional = scores[:batch], scores[batch:]
    return unconditional + scale * (conditional - unconditional)


def _sample(scores: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> torch.Tensor:
    """int64 (B,) ids drawn from float (B, V) ``scores`` at ``temperature``, among the ``top_k`` best (0: all)."""
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        threshold = scores.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _token_to_code(backend, tokens: torch.Tensor) -> torch.Tensor:
    """int64 (B,) VQ codes of visual-token ids."""
    lookup = torch.full((backend.vocabulary.size,), -1, dtype=torch.long)
    lookup[backend.code_to_token] = torch.arange(backend.code_to_token.numel())
    return lookup[tokens]
