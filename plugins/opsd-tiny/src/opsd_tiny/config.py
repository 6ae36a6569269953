"""Params of the ``tiny-umm`` backend and the ``frozen-lake`` task.

Owns: the fields, defaults and constraints of the plugin's config sections, and where the
shipped checkpoint lives.
Does not know: torch or models; importing this module stays light (``opsd list``,
``opsd validate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from opsd_core.api import PluginParams

SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "frozen-lake"
RANDOM_WEIGHTS = "random"


class TinyBackendParams(PluginParams):
    """The tiny UMM: where its weights come from (it runs on ``run.device``)."""

    checkpoint: str | None = Field(
        None,
        description="Checkpoint directory holding model.safetensors, config.json and vocab.json; None "
        "loads the pretrained frozen-lake checkpoint shipped in the package; 'random' builds fresh "
        "random weights of the default architecture (pretraining, tests).",
        min_length=1,
    )
    free_text: Literal["error", "skip"] = Field(
        "error",
        description="Words outside the vocabulary: 'error' refuses them (the tiny model reads only its "
        "task's words); 'skip' drops them, e.g. to push benchmark prompts through the pipeline.",
    )


class FrozenLakeParams(PluginParams):
    """Procedural frozen-lake maps; the defaults are those the shipped checkpoint was trained on."""

    size: int = Field(5, description="Grid side length in cells (tiny-umm reads 5x5 grids).", ge=3, le=8)
    hole_probability: float = Field(0.3, description="Probability that a cell is a hole.", ge=0.0, le=0.6)
    min_path: int = Field(4, description="Fewest moves of the shortest S-to-G path.", ge=1, le=40)
    max_path: int = Field(10, description="Most moves of the shortest S-to-G path.", ge=1, le=40)
    cell_pixels: int = Field(8, description="Pixels per cell side in the rendered images.", ge=4, le=32)
    pixel_noise: float = Field(
        0.03, description="Standard deviation of the Gaussian pixel noise of both images.", ge=0.0, le=0.5
    )
    eval_size: int = Field(1000, description="Number of fixed evaluation problems.", ge=1, le=100_000)
    eval_seed: int = Field(12345, description="Seed of the fixed evaluation problems.", ge=0)
    detour_probability: float = Field(
        0.5,
        description="Probability that a pretraining trace takes one random non-optimal move (not "
        "trained on) and then the canonical path from where it landed; only pretraining data uses it.",
        ge=0.0,
        le=1.0,
    )

    @model_validator(mode="after")
    def _path_bounds(self) -> FrozenLakeParams:
        if self.min_path > self.max_path:
            raise ValueError(f"min_path ({self.min_path}) must not exceed max_path ({self.max_path})")
        return self
