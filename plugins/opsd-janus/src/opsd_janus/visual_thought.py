"""Visual thoughts through Janus's own image-generation path.

Owns: the generation prompt (``<|User|>: {problem image}\\n{question}\\n{vt_prompt}\\n\\n
<|Assistant|>:<begin_of_image>``), its unconditional twin (every token but BOS and
``<begin_of_image>`` replaced by padding, as ``JanusForConditionalGeneration.generate`` builds
it, so the problem image is dropped too), the sampling loop (LLM hidden state ->
``generation_head`` -> classifier-free guidance -> temperature sample -> ``generation_embeddings``
+ ``generation_aligner`` as the next input), and decoding the codes with the VQ decoder into
PIL images.
Does not know: training, or what the images are used for.

The loop is ours rather than ``generate(generation_mode="image")`` because that draws with the
global RNG (no ``torch.Generator``, so no per-call reproducibility) and takes one prompt
length per batch; this one runs right-padded rows with per-row positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from opsd_core.api import Problem
from opsd_core.api.backend import choose_tokens
from opsd_janus import context as chat
from opsd_janus.decoding import JanusDecodeState, Rendered, step


def generation_prompts(backend, problems: Sequence[Problem]):
    """Conditional and unconditional prompts: 2B :class:`~opsd_janus.decoding.Rendered` rows."""
    conditional, unconditional = [], []
    for problem in problems:
        rendered = Rendered(tokens=[backend.ids["bos"]] + backend.encode(chat.USER_OPEN))
        backend.add_image(rendered, backend.preprocess_image(problem.image))
        rendered.tokens += backend.encode(f"\n{problem.question}\n{backend.params.vt_prompt}{chat.ASSISTANT_OPEN}")
        rendered.tokens.append(backend.ids["image_start"])
        conditional.append(rendered)
        blank = [backend.ids["pad"]] * (len(rendered.tokens) - 2)
        unconditional.append(Rendered(tokens=[backend.ids["bos"], *blank, backend.ids["image_start"]]))
    return conditional + unconditional


def guided_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """float (B, C) guided logits from float (2B, C): conditional rows first, then unconditional."""
    conditional, unconditional = logits.float().chunk(2)
    return unconditional + scale * (conditional - unconditional)


@torch.no_grad()
def draw_visual_thoughts(backend, model, problems: Sequence[Problem], generator: torch.Generator | None = None) -> list:
    """One PIL image per problem, ``visual_thought_side`` pixels square."""
    from transformers import DynamicCache

    params = backend.params
    rendered = generation_prompts(backend, problems)
    for r in rendered:
        backend.require_fits(len(r.tokens) + backend.image_tokens, "a visual-thought prompt plus its image tokens")
    cache = DynamicCache(config=model.config.text_config)
    hidden, attention, lengths = backend.hidden_states(model, rendered, cache)
    last = hidden[torch.arange(len(rendered), device=hidden.device), lengths - 1]  # (2B, D)
    state = JanusDecodeState(model, cache, attention, lengths.clone(), last, attention.shape[1] + backend.image_tokens)
    codes = []
    for index in range(backend.image_tokens):
        logits = guided_logits(model.model.generation_head(last), params.vt_guidance_scale)  # (B, C)
        chosen = choose_tokens(logits, params.vt_temperature, generator)  # (B,)
        codes.append(chosen)
        if index + 1 < backend.image_tokens:
            embeds = model.prepare_embeddings_for_image_generation(chosen.repeat(2).unsqueeze(1))  # (2B, 1, D)
            last = step(model, state, embeds.to(hidden.dtype))[:, -1]  # (2B, D)
    pixels = model.decode_image_tokens(torch.stack(codes, dim=1))  # (B, H, W, 3) in about [-1, 1]
    return [to_pil(image) for image in pixels]


def to_pil(pixels: torch.Tensor):
    """A PIL RGB image from float (H, W, 3) pixels in [-1, 1]."""
    from PIL import Image

    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
