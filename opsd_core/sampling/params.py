"""Params of the built-in samplers, validated from the ``[sampler]`` section (torch-free).

The sampling policy every sampler follows (temperature, completion and forward caps, image
skips) is the ``[sampling]`` section; these are the settings of one implementation.
"""

from __future__ import annotations

from pydantic import Field

from opsd_core.config.base import PluginParams


class BatchedSamplerParams(PluginParams):
    """The batched KV-cached sampler that decodes on the model's device."""

    sync_every: int | None = Field(
        None,
        description="Decode steps between the host's looks at the batch (to stop when every row has ended and "
        "to check image skips); None: 16 on GPUs, 1 elsewhere. Completions do not depend on it.",
        ge=1,
    )
