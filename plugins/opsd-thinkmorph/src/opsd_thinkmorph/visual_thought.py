"""Drawing visual thoughts with the model's own image generator.

Owns: the three guidance contexts of a problem (conditional: system, image as clean VAE block +
ViT block, question; text-unconditional: system and image; image-unconditional: system and
question), their prefilled caches, the velocity queries against them (one latent block at the
context's next RoPE id, bidirectional, the cache left untouched), and decoding latents to images.
Problems whose images resize to the same size are drawn as one batch.
Does not know: the flow schedule or how guidance combines (:mod:`opsd_thinkmorph.flow`), nor
the autoencoder's internals (:mod:`opsd_thinkmorph.vae`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opsd_core.api import Problem
from opsd_thinkmorph import prompts
from opsd_thinkmorph import vae as vae_ops
from opsd_thinkmorph.flow import GuidanceConfig, sample_visual_thought_latents
from opsd_thinkmorph.images import to_rgb
from opsd_thinkmorph.model import Bagel, KVCache
from opsd_thinkmorph.packing import LatentItem, TextItem, ViTItem, lay_out, pack_rows
from opsd_thinkmorph.runtime import forward_rows


def guidance_config(params) -> GuidanceConfig:
    return GuidanceConfig(
        text_scale=params.vt_text_scale,
        image_scale=params.vt_image_scale,
        interval=tuple(params.vt_interval),
        renorm=params.vt_renorm,
        renorm_min=params.vt_renorm_min,
        num_timesteps=params.vt_timesteps,
        shift=params.vt_shift,
    )


class FrozenContext:
    """A batch of contexts prefilled into a cache that velocity queries read but never extend."""

    def __init__(self, model: Bagel, items_per_row: Sequence[Sequence], pad_id: int):
        rows = pack_rows([lay_out(items, model.config) for items in items_per_row], pad_id)
        parameter = next(model.parameters())
        self.cache = KVCache(model.config.llm, len(items_per_row), rows.token_ids.shape[1], parameter.device, parameter.dtype)
        forward_rows(model, rows, self.cache)
        self.cache.set_frozen(True)
        self.next_positions = rows.next_positions.tolist()

    def velocity(self, model: Bagel, x: torch.Tensor, t: float, grid: tuple[int, int]) -> torch.Tensor:
        """float (B, M, 64) velocity at latent tokens float (B, M, 64) ``x`` and time ``t``."""
        sequences = [
            lay_out([LatentItem(x[row], grid, t)], model.config, start_position=self.next_positions[row])
            for row in range(x.shape[0])
        ]
        rows = pack_rows(sequences, model.config.special.endoftext)
        hidden = forward_rows(model, rows, self.cache)  # (B, M + 2, D)
        latent = hidden[rows.latent_slots.to(hidden.device)].view(x.shape[0], x.shape[1], -1)  # (B, M, D)
        return model.velocity(latent).float()


@torch.no_grad()
def draw_visual_thoughts(
    backend,
    model: Bagel,
    problems: Sequence[Problem],
    generator: torch.Generator | None,
    reasoning: Sequence[str] | None = None,
):
    """One PIL image per problem, at the VAE-resized size of its problem image.

    ``reasoning`` (one text per problem) is the model's own text so far: it joins the
    conditional context as a turn after the question, as in ThinkMorph's interleaved inference;
    the unconditional contexts never hold generated text.
    """
    if not model.config.visual_gen:
        raise RuntimeError("drawing visual thoughts needs the generation modules: set backend.generation = true")
    vae = backend.vae()
    guidance = guidance_config(backend.params)
    system = TextItem(backend.encode(prompts.INFERENCE_SYSTEM_PROMPT))
    groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    for index, problem in enumerate(problems):
        pixels = backend.vae_transform(to_rgb(problem.image))  # (3, H, W) in [-1, 1]
        groups.setdefault(tuple(pixels.shape[1:]), []).append((index, pixels))
    images: list = [None] * len(problems)
    for (height, width), members in groups.items():
        pixels = torch.stack([p for _, p in members]).to(backend.device)  # (B, 3, H, W)
        latents = vae_ops.encode(vae, pixels, generator=_on(generator, vae.device))
        tokens = vae_ops.latents_to_tokens(latents).float()  # (B, M, 64)
        grid = (height // model.config.latent_downsample, width // model.config.latent_downsample)
        rows = []
        for row, (index, image_pixels) in enumerate(members):
            vit = ViTItem(backend.vit_transform((image_pixels + 1) / 2))
            clean = LatentItem(tokens[row].cpu(), grid, 0.0)
            question = TextItem(backend.encode(problems[index].question))
            thought = [TextItem(backend.encode(reasoning[index]))] if reasoning is not None else []
            rows.append((clean, vit, question, thought))
        contexts = {
            "cond": FrozenContext(model, [[system, c, v, q, *t] for c, v, q, t in rows], backend.vocabulary.pad_id),
            "text_uncond": FrozenContext(model, [[system, c, v] for c, v, _, _ in rows], backend.vocabulary.pad_id),
            "image_uncond": FrozenContext(model, [[system, q] for _, _, q, _ in rows], backend.vocabulary.pad_id),
        }

        def velocity_fn(x, t, branches):
            return {branch: contexts[branch].velocity(model, x, t, grid) for branch in branches}

        noise = torch.randn(tokens.shape, generator=generator).to(backend.device)
        drawn = sample_visual_thought_latents(velocity_fn, noise, guidance)
        decoded = vae_ops.decode(vae, vae_ops.tokens_to_latents(drawn, *grid))
        for (index, _), picture in zip(members, vae_ops.to_pil(decoded)):
            images[index] = picture
    return images


def _on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` when it draws on ``device``, else a generator there seeded from it."""
    if generator is None or generator.device == torch.device(device):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device).manual_seed(seed)
