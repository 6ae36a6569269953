"""Params of the ``byte-umm`` backend, validated from the ``[backend]`` section.

Owns: where the weights come from (a local checkpoint directory, or seeded random weights)
and the architecture of freshly built models.
Does not know: torch; configs are validated without importing it (``opsd list``,
``opsd validate``).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from opsd_core.api import PluginParams


class ByteUMMParams(PluginParams):
    """The byte-level UMM: its weights and, for random weights, its sizes."""

    checkpoint: str | None = Field(
        None,
        description="Local directory written by save_pretrained (config.json and model.safetensors); its "
        "config.json fixes the architecture and the size fields below are ignored. None builds random "
        "weights from `seed`.",
        min_length=1,
    )
    seed: int = Field(0, description="Seed of the random weights when no checkpoint is given.", ge=0)
    d_model: int = Field(64, description="Model width D.", ge=8, le=4096)
    n_layers: int = Field(2, description="Transformer blocks.", ge=1, le=64)
    n_heads: int = Field(4, description="Attention heads H; must divide d_model.", ge=1, le=64)
    max_positions: int = Field(
        1024, description="Most positions one row may hold: its context plus its completion.", ge=64
    )
    image_size: int = Field(16, description="Side in pixels every image is resized to.", ge=2, le=512)
    patch_size: int = Field(4, description="Side in pixels of one image patch; must divide image_size.", ge=1, le=64)

    @model_validator(mode="after")
    def _sizes_fit(self) -> ByteUMMParams:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        return self
