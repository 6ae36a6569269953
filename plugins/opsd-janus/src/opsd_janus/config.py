"""Params of the ``janus-pro`` backend.

Owns: the fields, defaults and constraints of the backend's config section: where the weights
are (or the tiny ``debug`` flavour), the image size, the longest context the
run may render, and the visual-thought generation settings (CFG scale, temperature, top-k,
image tokens).
Does not know: torch or models, or where they run (``run.device``, ``run.precision``); importing this module stays light (``opsd list``,
``opsd validate``). Constraints that need the checkpoint's own config (its image size, its
position limit) are checked when the backend is constructed, before any step runs.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from opsd_core.api import PluginParams

CHECKPOINT = "checkpoint"
DEBUG = "debug"


class JanusParams(PluginParams):
    """Janus-Pro from a local directory in the Hugging Face layout, or a tiny random flavour."""

    flavour: Literal["checkpoint", "debug"] = Field(
        CHECKPOINT,
        description="'checkpoint' loads `checkpoint`; 'debug' builds a tiny JanusConfig in code (small "
        "Llama, SigLIP-style ViT and VQ model) with seeded random weights and a byte-level tokenizer "
        "made locally (CPU tests).",
    )
    checkpoint: str | None = Field(
        None,
        description="Directory in the Hugging Face layout of deepseek-community/Janus-Pro-1B or -7B: "
        "config.json, model.safetensors (or shards with model.safetensors.index.json), the tokenizer "
        "files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) and "
        "preprocessor_config.json. Nothing is downloaded.",
        min_length=1,
    )
    seed: int = Field(0, description="Seed of the debug flavour's random weights.", ge=0)
    image_size: int = Field(
        384,
        description="Side in pixels of the square images the understanding encoder reads and the VQ "
        "decoder draws. Must equal the checkpoint's vision_config.image_size (384 for Janus-Pro); "
        "the debug flavour builds its encoder at this size.",
        ge=8,
    )
    image_tokens: int | None = Field(
        None,
        description="Tokens per image, in the context (understanding) and per visual thought "
        "(generation). None takes the checkpoint's vision_config.num_image_tokens (576); the debug "
        "flavour needs a square number whose root divides image_size (default 16).",
        ge=1,
    )
    max_context_tokens: int | None = Field(
        None,
        description="Longest context plus completion the run may render. None takes the model's "
        "max_position_embeddings; a larger value is refused at construction.",
        ge=1,
    )
    vt_guidance_scale: float = Field(
        5.0, description="Visual thoughts: classifier-free guidance scale on the image-token logits (1 disables it).", ge=1
    )
    vt_temperature: float = Field(
        1.0, description="Visual thoughts: sampling temperature of the image tokens (0 = greedy).", ge=0
    )
    vt_top_k: int = Field(
        0,
        description="Visual thoughts: sample among the top-k image tokens after guidance and temperature (0 keeps "
        "them all, as DeepSeek's Janus-Pro generation script does; transformers' generate applies its default "
        "top_k = 50 unless told otherwise).",
        ge=0,
    )
    vt_prompt: str = Field(
        "Draw the intermediate visual thought that solves this problem.",
        description="Visual thoughts: the instruction placed after the problem image and question in the "
        "image-generation prompt.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> JanusParams:
        if self.flavour == CHECKPOINT and self.checkpoint is None:
            raise ValueError(
                "backend.checkpoint is required with flavour 'checkpoint': a local directory in the Hugging "
                "Face Janus-Pro layout (config.json, model.safetensors, tokenizer.json, "
                "preprocessor_config.json); nothing is downloaded. Or set flavour = 'debug'."
            )
        if self.flavour == DEBUG:
            tokens = self.image_tokens or 16
            side = math.isqrt(tokens)
            if side * side != tokens or self.image_size % side:
                raise ValueError(
                    f"backend.image_tokens: the debug flavour needs a square number whose root divides "
                    f"image_size={self.image_size} (got {tokens}); e.g. 16 with image_size 32"
                )
            patch = self.image_size // side
            if patch < 2 or patch & (patch - 1):
                raise ValueError(
                    f"backend.image_size: the debug flavour's VQ decoder upsamples by powers of two, so "
                    f"image_size / sqrt(image_tokens) must be a power of two >= 2 (got {self.image_size} / {side})"
                )
        return self
