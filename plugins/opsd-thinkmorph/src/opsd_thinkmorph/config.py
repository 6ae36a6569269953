"""Params of the ``thinkmorph`` backend.

Owns: the fields, defaults and constraints of the backend's config section: where the weights
are, which flavour to build, image sizes, and visual-thought generation
settings.
Does not know: torch or models, or where they run (``run.device``, ``run.precision``); importing this module stays light (``opsd list``,
``opsd validate``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opsd_core.api import PluginParams

CHECKPOINT = "checkpoint"
DEBUG = "debug"
RANDOM_7B = "7b-random"


class ThinkMorphParams(PluginParams):
    """ThinkMorph-7B (BAGEL-7B-MoT architecture) from a local directory, or a random-weight flavour."""

    flavour: Literal["checkpoint", "debug", "7b-random"] = Field(
        CHECKPOINT,
        description="'checkpoint' loads `checkpoint`; 'debug' builds the same architecture at tiny sizes "
        "with seeded random weights and a byte tokenizer (CPU tests); '7b-random' builds the full-size "
        "architecture with random weights (the GPU timing scripts).",
    )
    checkpoint: str | None = Field(
        None,
        description="Directory in the released layout: llm_config.json, vit_config.json, model.safetensors "
        "or ema.safetensors (or shards with their index), ae.safetensors and the Qwen2 tokenizer files.",
        min_length=1,
    )
    weights_file: Literal["auto", "model", "ema"] = Field(
        "auto",
        description="Which weights to read: model.safetensors, ema.safetensors, or 'auto' (model when "
        "present, else ema). Student and teacher always start from the same file.",
    )
    generation: bool = Field(
        True,
        description="Build the image-generation modules (needed to draw visual thoughts); false loads "
        "understanding-only checkpoints that lack them.",
    )
    train_generation: bool = Field(
        False,
        description="Train the image-generation parameters too (the generation expert's *_moe_gen "
        "weights, time embedder, vae2llm and llm2vae), as the paper's code does. OPSD's student and teacher "
        "contexts never run them, so they receive no gradient: false (the default) freezes them, which "
        "gives the same updates at optim.weight_decay = 0 and holds no gradients, AdamW state or EMA copy "
        "for them.",
    )
    seed: int = Field(0, description="Seed of the random-weight flavours.", ge=0)
    random_layers: int | None = Field(
        None,
        description="'7b-random' only: decoder layers to build instead of the architecture's 28 (every "
        "other size stays full): a model of the full width that fits one GPU with full fine-tuning, for "
        "the memory and timing scripts. None builds all 28.",
        ge=1,
        le=28,
    )
    fixed_shape_decoding: bool = Field(
        True,
        description="Decode with fixed-shape steps (each attends over the whole preallocated cache with a "
        "mask), captured once in a CUDA graph and replayed on GPUs; false uses steps that grow with the "
        "cache and launch every kernel anew.",
    )
    vit_attention: Literal["sdpa", "flash-attn"] = Field(
        "sdpa",
        description="Attention kernel of the ViT: torch SDPA one image at a time, or 'flash-attn' (one "
        "flash_attn_varlen_func call over all images; needs the flash-attn package and a GPU). The LLM's "
        "packed rows carry a mask that mixes causal text with bidirectional image blocks and always use SDPA.",
    )
    compile_decoding: bool = Field(
        True,
        description="On GPUs, run each decoder layer of the fixed-shape decode step through torch.compile "
        "(fusing its small elementwise kernels) before the CUDA graph is captured. Compiling takes tens of "
        "seconds on first use and once more when batch or cache shapes change; models sharded by FSDP "
        "decode without it.",
    )
    kept_decoders: int = Field(
        4,
        description="Fixed-shape decoders kept between sampling calls (evaluation answers, `opsd infer`; "
        "a training step drops them around its sampling), least recently used dropped first. One is kept per batch size and cache bucket (the "
        "positions needed rounded up: at least 256, then four buckets per doubling), so the warm-up, "
        "compile and CUDA-graph capture are paid once per bucket, not once per call; each keeps its KV "
        "cache (batch x bucket positions) allocated between calls. 0 builds a decoder per call and "
        "frees its cache afterwards.",
        ge=0,
    )
    decode_kernels: bool = Field(
        True,
        description="Fixed-shape decode steps of one row run each decoder layer in four weight passes "
        "(opsd_core.api.kernels: q/k/v together, o with the residual, gate/up with SwiGLU, down with the "
        "residual) and one-query attention (opsd_core.api.kernels): Triton kernels on GPUs, the same "
        "arithmetic in torch elsewhere (sharded models use them while their weights are gathered, as "
        "they are for sampling). False runs the layer as written (a library matrix product per "
        "projection, library attention).",
    )
    vit_max_size: int = Field(980, description="ViT transform: longest image side in pixels.", ge=14)
    vit_min_size: int = Field(378, description="ViT transform: shortest image side in pixels.", ge=14)
    vit_max_pixels: int = Field(2_007_040, description="ViT transform: cap on pixels per image.", ge=196)
    vae_max_size: int = Field(1024, description="VAE transform: longest image side in pixels.", ge=16)
    vae_min_size: int = Field(512, description="VAE transform: shortest image side in pixels.", ge=16)
    vt_text_scale: float = Field(4.0, description="Visual thoughts: text CFG scale (<= 1 disables guidance).", ge=0)
    vt_image_scale: float = Field(2.0, description="Visual thoughts: image CFG scale (<= 1 disables it).", ge=0)
    vt_interval: tuple[float, float] = Field(
        (0.0, 1.0), description="Visual thoughts: guidance applies for timesteps lo < t <= hi."
    )
    vt_renorm: Literal["global", "channel", "text_channel"] = Field(
        "text_channel", description="Visual thoughts: how guided velocities are renormalised."
    )
    vt_renorm_min: float = Field(0.0, description="Visual thoughts: lower clamp of the renorm factor.", ge=0)
    vt_timesteps: int = Field(50, description="Visual thoughts: points of the flow schedule.", ge=2, le=1000)
    vt_shift: float = Field(3.0, description="Visual thoughts: timestep shift of the schedule.", gt=0)

    @model_validator(mode="after")
    def _checkpoint_for_flavour(self) -> ThinkMorphParams:
        if self.random_layers is not None and self.flavour != RANDOM_7B:
            raise ValueError(f"random_layers applies to flavour '{RANDOM_7B}' only (flavour is {self.flavour!r})")
        if self.flavour == CHECKPOINT and self.checkpoint is None:
            raise ValueError(
                "backend.checkpoint is required with flavour 'checkpoint': the local ThinkMorph-7B "
                "directory (nothing is downloaded); or set flavour = 'debug' for the tiny random model"
            )
        lo, hi = self.vt_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"vt_interval must satisfy 0 <= lo <= hi <= 1, got {self.vt_interval}")
        if self.vit_min_size > self.vit_max_size or self.vae_min_size > self.vae_max_size:
            raise ValueError("image transforms: min sizes must not exceed max sizes")
        return self
