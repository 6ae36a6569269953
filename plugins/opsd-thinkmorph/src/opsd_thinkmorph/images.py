"""Image preprocessing of BAGEL: the size rule, RGB conversion and [-1, 1] normalisation.

Owns: turning a task's image (PIL, or float (3, H, W) in [0, 1]) into model pixels whose
sides are multiples of the stride (14 for the ViT, 16 for the VAE).
Does not know: patches, latents or models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage


def to_rgb(image) -> PILImage.Image:
    """A PIL RGB image; transparent pixels are composited onto white."""
    if isinstance(image, torch.Tensor):
        array = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return PILImage.fromarray(array, "RGB")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = PILImage.new("RGBA", image.size, (255, 255, 255, 255))
        return PILImage.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageTransform:
    """BAGEL's resize rule.

    The long side is brought down to ``max_size`` (never up), the short side up to at least
    ``min_size``; both sides snap to multiples of ``stride``; then the pixel count is capped at
    ``max_pixels`` and the long side at ``max_size`` again.
    """

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = 14 * 14 * 9 * 1024

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        w, h = self._snap(width * scale), self._snap(height * scale)
        if w * h > self.max_pixels:
            shrink = (self.max_pixels / (w * h)) ** 0.5
            w, h = self._snap(w * shrink), self._snap(h * shrink)
        if max(w, h) > self.max_size:
            shrink = self.max_size / max(w, h)
            w, h = self._snap(w * shrink), self._snap(h * shrink)
        return w, h

    def _snap(self, side: float) -> int:
        return max(self.stride, int(round(side / self.stride)) * self.stride)

    def __call__(self, image) -> torch.Tensor:
        """float32 (3, H, W) in [-1, 1]."""
        picture = to_rgb(image)
        size = self.target_size(*picture.size)
        if size != picture.size:
            picture = picture.resize(size, PILImage.BICUBIC)
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return pixels * 2.0 - 1.0
