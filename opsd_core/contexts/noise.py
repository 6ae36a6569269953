"""The Gaussian-noise control: the teacher's visual thought replaced by N(0, 1) pixels.

Owns: building a context whose VT segments carry noise of the preprocessed image's shape,
in the backend's normalised pixel space (what the paper's code does), everything else
unchanged.
Does not know: models or losses.
"""

from __future__ import annotations

import torch

from opsd_core.interfaces.backend import Backend
from opsd_core.types import VISUAL_THOUGHT, Context, ImageSegment


def with_noise_visual_thought(context: Context, backend: Backend, generator: torch.Generator | None) -> Context:
    """``context`` with every visual-thought image replaced by fresh N(0, 1) pixels."""
    segments = []
    for segment in context.segments:
        if isinstance(segment, ImageSegment) and segment.name == VISUAL_THOUGHT:
            shape = backend.preprocess_image(segment.image).shape
            device = generator.device if generator is not None else "cpu"
            noise = torch.randn(shape, generator=generator, device=device).cpu()
            segment = ImageSegment(segment.name, segment.image, pixels=noise)
        segments.append(segment)
    if len(segments) == len(context.segments) and all(a is b for a, b in zip(segments, context.segments)):
        raise ValueError(f"context has no {VISUAL_THOUGHT!r} image to replace; it has {context.names()}")
    return Context(tuple(segments))
