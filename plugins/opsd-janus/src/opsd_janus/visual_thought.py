"""Visual thoughts through Janus's own image-generation path.

Owns: the generation prompt (``<|User|>: {problem image}\\n{question}\\n{vt_prompt}\\n\\n
<|Assistant|>:<begin_of_image>``), its unconditional twin (every token but BOS and
``<begin_of_image>`` replaced by padding, as ``JanusForConditionalGeneration.generate`` masks
it, so the problem image's features are dropped too), the sampling loop (LLM hidden state ->
``generation_head`` -> classifier-free guidance -> temperature and top-k -> a draw ->
``generation_embeddings`` + ``generation_aligner`` as the next input), and decoding the codes
with the VQ decoder and the image processor's post-processing into PIL images.
Does not know: training, or what the images are used for.

The loop draws exactly as ``generate(generation_mode="image")`` does (the same guidance, warpers
and multinomial draw; the tests compare whole token sequences on a tiny model), but is ours
because that method reads no pixels (the problem image could not be in the prompt) and draws
from the global random stream, where this one takes a ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_core.api import Problem
from opsd_core.api.backend import top_k_draw
from opsd_janus import context as chat
from opsd_janus.decoding import JanusDecodeState, Rendered, step


def generation_prompts(backend, problems: Sequence[Problem]):
    """Conditional and unconditional prompts: 2B :class:`~opsd_janus.decoding.Rendered` rows."""
    conditional = []
    for problem in problems:
        rendered = Rendered(tokens=[backend.ids["bos"]] + backend.encode(chat.USER_OPEN))
        backend.add_image(rendered, backend.preprocess_image(problem.image))
        rendered.tokens += backend.encode(f"\n{problem.question}\n{backend.params.vt_prompt}{chat.ASSISTANT_OPEN}")
        rendered.tokens.append(backend.ids["image_start"])
        conditional.append(rendered)
    return conditional + [unconditional_prompt(backend, rendered) for rendered in conditional]


def unconditional_prompt(backend, rendered):
    """The unconditional twin of a conditional :class:`~opsd_janus.decoding.Rendered` prompt: every
    token but BOS and ``<begin_of_image>`` replaced by padding (so the problem image's slots are
    padding and no image features are spliced in), as ``JanusForConditionalGeneration.generate``
    masks its unconditional rows."""
    kept = {backend.ids["bos"], backend.ids["image_start"]}
    return Rendered(tokens=[token if token in kept else backend.ids["pad"] for token in rendered.tokens])


def guided_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """float (B, C) guided logits from float (2B, C): conditional rows first, then unconditional."""
    conditional, unconditional = logits.float().chunk(2)
    return unconditional + scale * (conditional - unconditional)


@torch.no_grad()
def draw_visual_thoughts(backend, model, problems: Sequence[Problem], generator: torch.Generator | None = None) -> list:
    """One PIL image per problem, ``visual_thought_side`` pixels square."""
    rendered = generation_prompts(backend, problems)
    for r in rendered:
        backend.require_fits(len(r.tokens) + backend.image_tokens, "a visual-thought prompt plus its image tokens")
    codes = draw_codes(backend, model, rendered, generator)  # (B, N)
    return decode_codes(backend, model, codes)


@torch.no_grad()
def draw_codes(backend, model, rendered: Sequence, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 (B, N) image codes, N = ``image_tokens``, from 2B prompt rows (B conditional, then
    their B unconditional twins): hidden state -> ``generation_head`` -> guidance -> temperature
    and top-k -> a draw (``top_k_draw``, as ``generate`` samples) -> ``generation_embeddings`` + ``generation_aligner``
    as the next input."""
    from transformers import DynamicCache

    params = backend.params
    cache = DynamicCache(config=model.config.text_config)
    hidden, attention, lengths = backend.hidden_states(model, rendered, cache)
    last = hidden[torch.arange(len(rendered), device=hidden.device), lengths - 1]  # (2B, D)
    state = JanusDecodeState(model, cache, attention, lengths.clone(), last, attention.shape[1] + backend.image_tokens)
    codes = []
    for index in range(backend.image_tokens):
        logits = guided_logits(model.model.generation_head(last), params.vt_guidance_scale)  # (B, C)
        chosen = top_k_draw(logits, params.vt_temperature, params.vt_top_k, generator)  # (B,)
        codes.append(chosen)
        if index + 1 < backend.image_tokens:
            embeds = model.prepare_embeddings_for_image_generation(chosen.repeat(2).unsqueeze(1))  # (2B, 1, D)
            last = step(model, state, embeds.to(hidden.dtype))[:, -1]  # (2B, D)
    return torch.stack(codes, dim=1)


def decode_codes(backend, model, codes: torch.Tensor) -> list:
    """PIL images of int64 (B, N) codes: ``decode_image_tokens`` (float (B, H, W, 3) in the
    normalised space), then the image processor's ``postprocess`` (unnormalise, scale to 0-255,
    clip, truncate to uint8), as transformers' Janus image generation turns tokens into images.
    The images go to ``postprocess`` channels first: the NumPy processor normalises only that layout."""
    pixels = model.decode_image_tokens(codes).permute(0, 3, 1, 2)  # (B, 3, H, W)
    images = list(pixels.float().cpu())
    return backend.image_processor().postprocess(images, return_tensors="PIL.Image.Image")["pixel_values"]
