"""Params of the ThinkMorph training-data task.

Owns: the fields, defaults (the paper's data recipe) and constraints of the task's config
section.
Does not know: parquet, images or torch; importing it stays light (``opsd list``,
``opsd validate``).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from opsd_core.api import PluginParams

PAPER_DATASETS = ["Visual_Search", "Spatial_Navigation", "Jigsaw_Assembly", "Chart_Refocus"]
PAPER_NUM_USED = [6990, 6000, 6000, 6000]


class ThinkMorphDataParams(PluginParams):
    """ThinkMorph's four parquet datasets, read from a local directory; defaults follow the paper."""

    root: str = Field(
        description="Directory holding one folder per dataset, each with its parquet files: "
        "<root>/<Task>/data/train-00000-of-0000N.parquet (the layout of the ThinkMorph datasets on the hub).",
        min_length=1,
    )
    datasets: list[Annotated[str, Field(min_length=1, pattern=r"^[^/\\]+$")]] = Field(
        default_factory=lambda: list(PAPER_DATASETS),
        description="Dataset folder names under root, mixed uniformly by row count.",
        min_length=1,
    )
    num_used: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: list(PAPER_NUM_USED),
        description="Rows used per dataset, one cap per entry of datasets, taken in file and row order "
        "(the paper's 6990/6000/6000/6000); an empty list uses every row (TOML has no null).",
    )
    split_pattern: str = Field(
        "train",
        description="Substring a parquet file name must contain to be read (empty: every *.parquet file).",
    )
    eval_fraction: float = Field(
        0.0,
        description="Fraction of rows held out for evaluation, chosen by a seeded hash of dataset and pid so "
        "the split never changes; 0 (the paper) trains on every row and leaves no evaluation set.",
        ge=0.0,
        lt=1.0,
    )
    eval_size: int | None = Field(
        None, description="At most this many evaluation problems (None: every held-out row).", ge=1
    )
    max_reference_images: int = Field(
        8,
        description="reasoning_image_i and resoning_thought_i columns considered, i < this (the paper's 8; the "
        "released data has one of each).",
        ge=1,
        le=64,
    )
    shuffle_seed: int = Field(
        42,
        description="Seed of the held-out split's hash and of the evaluation order; the training order comes "
        "from the run seed.",
        ge=0,
    )

    @model_validator(mode="after")
    def _one_cap_per_dataset(self) -> ThinkMorphDataParams:
        if len(set(self.datasets)) != len(self.datasets):
            repeated = sorted({name for name in self.datasets if self.datasets.count(name) > 1})
            raise ValueError(f"datasets lists {repeated} more than once; name each dataset once")
        if self.num_used and len(self.num_used) != len(self.datasets):
            raise ValueError(
                f"num_used has {len(self.num_used)} entries but datasets has {len(self.datasets)}; give one cap "
                f"per dataset, in the same order, or num_used = [] to use every row"
            )
        return self
