"""Params of the tiny backend and the frozen-lake task (torch-free)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from opsd_core.config import PluginParams

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "frozen-lake"


class TinyBackendParams(PluginParams):
    """The tiny UMM: where its weights are."""

    checkpoint: str | None = Field(
        None,
        description="Directory with model.safetensors, config.json and vocab.json (None: the shipped "
        "pretrained frozen-lake checkpoint). Use `random` for fresh random weights of the default size.",
    )


class FrozenLakeParams(PluginParams):
    """Procedural frozen-lake maps; the defaults are those the shipped checkpoint was trained on."""

    size: int = Field(5, description="Grid side length (cells).", ge=3, le=8)
    hole_probability: float = Field(0.3, description="Probability that a cell is a hole.", ge=0.0, lt=0.7)
    min_path: int = Field(4, description="Shortest S-to-G path must have at least this many moves.", ge=1)
    max_path: int = Field(10, description="Shortest S-to-G path must have at most this many moves.", ge=1)
    cell_pixels: int = Field(8, description="Pixels per cell side in the rendered images.", ge=4)
    pixel_noise: float = Field(0.03, description="Std of the Gaussian pixel noise added to rendered images.", ge=0.0)
    eval_size: int = Field(1000, description="Number of fixed evaluation problems.", ge=1)
    eval_seed: int = Field(12345, description="Seed of the evaluation problems.", ge=0)

    @model_validator(mode="after")
    def _path_bounds(self) -> FrozenLakeParams:
        if self.min_path > self.max_path:
            raise ValueError(f"min_path ({self.min_path}) must not exceed max_path ({self.max_path})")
        return self
