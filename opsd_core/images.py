"""Small image helpers shared by tasks and commands.

Owns: converting between the two image forms tasks hand over (PIL, or float32 (3, H, W) in
[0, 1]) and writing PNGs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def to_pil(image: Any):
    """A PIL RGB image from PIL or a float (3, H, W) tensor/array in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(array.shape)}")
    array = (np.clip(array.transpose(1, 2, 0), 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array, mode="RGB")


def save_png(image: Any, path: Path, scale: int = 1) -> None:
    """Write ``image`` as PNG, optionally enlarged ``scale`` times (nearest neighbour)."""
    picture = to_pil(image)
    if scale > 1:
        from PIL import Image

        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)
