"""Drawing visual thoughts with Emu3's own image path: image tokens sampled, then VQ-decoded.

Owns: the conditional prompt of a problem (its student context, then the image header
``<|image start|>{h}*{w}<|image token|>``) and the unconditional one (BOS, the negative prompt,
the same header), classifier-free guidance on their log-probabilities, the position rule that
only visual tokens are sampled and an end-of-line token closes every row (what transformers'
``prefix_allowed_tokens_fn`` does for Emu3's ``generate``), temperature and top-k, and decoding
the code grid to PIL images. Each step is what transformers' ``generate`` does with those
settings (the tests compare whole token sequences); the loop is ours because it takes a
``torch.Generator`` and runs the conditional and unconditional rows as one batch.
Does not know: how the context is laid out (the backend renders it) or the VQ-VAE's internals.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_core.api import Problem
from opsd_core.api.backend import top_k_draw


@torch.no_grad()
def draw_visual_thoughts(backend, model, problems: Sequence[Problem], generator: torch.Generator | None) -> list:
    """One PIL image per problem, ``rows * f`` by ``columns * f`` pixels for ``params.vt_grid``."""
    rows, columns = backend.params.vt_grid
    header = backend.image_header(rows, columns)
    builder = backend.context_builder()
    prompts = [backend.render(model, builder.student_context(problem)) + header for problem in problems]
    codes = draw_codes(backend, model, prompts, negative_prompt(backend), generator)  # (B, rows, columns)
    return decode_codes(backend, model, codes)


def negative_prompt(backend) -> list[int]:
    """The unconditional prompt: BOS, ``vt_negative_prompt``, the image header of ``vt_grid``."""
    return [backend.ids["bos"], *backend.encode(backend.params.vt_negative_prompt), *backend.image_header(*backend.params.vt_grid)]


def allowed_tokens(backend, step: int) -> torch.Tensor:
    """int64 (A,) the ids that may follow ``step`` tokens of a ``vt_grid`` image: the end-of-line
    token after every row's ``columns`` codes, a visual token anywhere else."""
    columns = backend.params.vt_grid[1]
    if step % (columns + 1) == columns:
        return torch.tensor([backend.ids["end_of_line"]])
    return backend.code_to_token


@torch.no_grad()
def draw_codes(
    backend,
    model,
    prompts: Sequence[Sequence[int]],
    negative: Sequence[int],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """int64 (B, rows, columns) VQ codes drawn after B token-id ``prompts`` (each ending with the image
    header), guided by the ``negative`` prompt when ``vt_guidance_scale`` > 1.

    Every step, end-of-line steps included, goes as transformers' ``generate`` with guidance, a
    prefix constraint, temperature and top-k: log-softmax of the conditional and unconditional
    logits, guidance, every id but the allowed ones set to -inf, then a draw (argmax at
    temperature 0). End-of-line steps draw too, so the random stream advances as there."""
    params = backend.params
    rows, columns = params.vt_grid
    batch = len(prompts)
    guided = params.vt_guidance_scale > 1.0
    state = backend.prefill(model, [*prompts, *([negative] * batch if guided else [])], rows * (columns + 1))
    codes = torch.empty(batch, rows, columns, dtype=torch.long)
    logits = state.logits
    for step in range(rows * (columns + 1)):
        scores = _guided_scores(logits.float().cpu(), batch, params.vt_guidance_scale if guided else None)  # (B, V)
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        allowed[allowed_tokens(backend, step)] = True
        scores = scores.masked_fill(~allowed, float("-inf"))
        token = top_k_draw(scores, params.vt_temperature, params.vt_top_k, generator)  # (B,)
        row, column = divmod(step, columns + 1)
        if column < columns:
            codes[:, row, column] = _token_to_code(backend, token)
        if step + 1 < rows * (columns + 1):
            logits = backend.decode_step(state, torch.cat([token, token]) if guided else token)
    return codes


def decode_codes(backend, model, codes: torch.Tensor) -> list:
    """PIL images of int64 (B, rows, columns) VQ codes: the VQ-VAE's decoder in eval mode (its
    BatchNorm layers use and keep their running statistics), then the image processor's
    ``postprocess``, as transformers' Emu3 image generation turns codes into images."""
    vq = model.model.vqmodel
    was_training = vq.training
    vq.eval()
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
    return scale * (conditional - unconditional) + unconditional


def _token_to_code(backend, tokens: torch.Tensor) -> torch.Tensor:
    """int64 (B,) VQ codes of visual-token ids."""
    lookup = torch.full((backend.vocabulary.size,), -1, dtype=torch.long)
    lookup[backend.code_to_token] = torch.arange(backend.code_to_token.numel())
    return lookup[tokens]
