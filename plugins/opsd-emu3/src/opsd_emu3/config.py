"""Params of the ``emu3`` backend.

Owns: the fields, defaults and constraints of the backend's config section: where the weights
are and which of Emu3's two released checkpoints they are, the optional second checkpoint
that draws visual thoughts, how context
images are sized, and the visual-thought sampling settings (grid, guidance, temperature).
Does not know: torch or models, or where they run (``run.device``, ``run.precision``); importing this module stays light (``opsd list``,
``opsd validate``). Limits that depend on the checkpoint (maximum positions, the VQ's spatial
factor) are checked when the backend is constructed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from opsd_core.api import PluginParams

CHECKPOINT = "checkpoint"
DEBUG = "debug"


class Emu3Params(PluginParams):
    """Emu3 from a local directory in the Hugging Face layout, or the tiny random ``debug`` flavour."""

    flavour: Literal["checkpoint", "debug"] = Field(
        CHECKPOINT,
        description="'checkpoint' loads `checkpoint`; 'debug' builds a tiny Emu3 (2-layer text model, "
        "4-level VQ-VAE with 64 codes, byte-level tokenizer with Emu3's image tokens) with seeded random "
        "weights, entirely in code (CPU tests).",
    )
    checkpoint: str | None = Field(
        None,
        description="Directory in the Hugging Face layout of Emu3-Chat-hf / Emu3-Gen-hf: config.json "
        "(model_type 'emu3', with its vocabulary_map), model.safetensors or its shards with "
        "model.safetensors.index.json, and tokenizer.json with tokenizer_config.json.",
        min_length=1,
    )
    checkpoint_kind: Literal["chat", "gen"] | None = Field(
        None,
        description="Which released Emu3 checkpoint `checkpoint` is. Emu3 ships two: 'chat' (understanding: "
        "answers questions about images, cannot draw visual thoughts) and 'gen' (text-to-image: draws "
        "visual thoughts, weak at answering). Required with flavour 'checkpoint'; one model cannot be both.",
    )
    drawing_checkpoint: str | None = Field(
        None,
        description="Directory of a second Emu3 checkpoint in the Hugging Face layout (Emu3-Gen-hf) that draws "
        "the visual thoughts while `checkpoint` (Emu3-Chat-hf, checkpoint_kind 'chat') answers: loaded once, "
        "frozen, on run.device in the run's weight dtype, and used instead of the teacher for drawing. The visual thought is then "
        "Gen's drawing, not the answering model's own. Its vocabulary map must equal the answering model's. "
        "Also allowed with flavour 'debug' (a directory the debug flavour saved), for tests.",
        min_length=1,
    )
    seed: int = Field(0, description="Seed of the debug flavour's random weights.", ge=0)
    image_min_pixels: int = Field(
        64 * 64,
        description="Context images are resized (aspect kept, sides multiples of the VQ's spatial factor) to at "
        "least this many pixels.",
        ge=1,
    )
    image_max_pixels: int = Field(
        256 * 256,
        description="... and at most this many. Each image costs (H/8) * (W/8 + 1) context positions at "
        "spatial factor 8; Emu3's own processor allows 1024*1024, which overflows its 9216 positions.",
        ge=1,
    )
    vt_grid: tuple[int, int] = Field(
        (32, 32),
        description="Visual thoughts: the image-token grid (rows, columns) sampled; the image is rows * f by "
        "columns * f pixels for the VQ's spatial factor f (8 for Emu3).",
    )
    vt_guidance_scale: float = Field(
        3.0, description="Visual thoughts: classifier-free guidance scale (1 disables guidance).", ge=1.0
    )
    vt_temperature: float = Field(
        1.0, description="Visual thoughts: sampling temperature of image tokens (0 = greedy).", ge=0
    )
    vt_top_k: int = Field(
        2048, description="Visual thoughts: sample among the top-k visual tokens (0 keeps them all).", ge=0
    )
    vt_negative_prompt: str = Field(
        "", description="Visual thoughts: the text of the unconditional (negative) prompt used by guidance."
    )

    @model_validator(mode="after")
    def _checkpoint_for_flavour(self) -> Emu3Params:
        if self.flavour == CHECKPOINT:
            if self.checkpoint is None:
                raise ValueError(
                    "backend.checkpoint is required with flavour 'checkpoint': a local Emu3-Chat-hf or Emu3-Gen-hf "
                    "directory (nothing is downloaded); or set flavour = 'debug' for the tiny random model"
                )
            if self.checkpoint_kind is None:
                raise ValueError(
                    "backend.checkpoint_kind is required with flavour 'checkpoint': 'chat' for Emu3-Chat-hf "
                    "(understanding; use stored visual thoughts) or 'gen' for Emu3-Gen-hf (draws visual thoughts)"
                )
        elif self.checkpoint is not None or self.checkpoint_kind is not None:
            raise ValueError("backend.checkpoint and backend.checkpoint_kind apply only to flavour 'checkpoint'")
        if self.drawing_checkpoint is not None and self.checkpoint_kind == "gen":
            raise ValueError(
                "backend.drawing_checkpoint is set with checkpoint_kind = 'gen', which draws itself; drop "
                "drawing_checkpoint, or answer with Emu3-Chat-hf (checkpoint_kind = 'chat') and draw with it"
            )
        if self.image_min_pixels > self.image_max_pixels:
            raise ValueError(
                f"backend.image_min_pixels ({self.image_min_pixels}) exceeds backend.image_max_pixels "
                f"({self.image_max_pixels})"
            )
        if min(self.vt_grid) < 1:
            raise ValueError(f"backend.vt_grid must hold two positive token counts, got {self.vt_grid}")
        return self

    @property
    def can_draw(self) -> bool:
        """Whether visual thoughts can be drawn: by weights trained to generate images, or by the
        drawing checkpoint (the debug flavour stands in for both kinds)."""
        return self.flavour == DEBUG or self.checkpoint_kind == "gen" or self.drawing_checkpoint is not None
