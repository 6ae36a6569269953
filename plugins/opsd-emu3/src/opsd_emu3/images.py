"""Images in and out of Emu3's VQ-VAE pixel space.

Owns: resizing a task's image the way Emu3's image processor does (aspect kept, sides multiples
of the VQ's spatial factor, pixel count clamped), normalising with the processor's mean and
std, and turning the VQ decoder's output back into PIL images (by the image processor's
post-processing).
Does not know: tokens, models or contexts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage

# Emu3ImageProcessor's defaults (OpenAI CLIP statistics); a checkpoint's preprocessor_config.json overrides them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image) -> PILImage.Image:
    """A PIL RGB image from a PIL image or a float (3, H, W) tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return PILImage.fromarray(array, "RGB")
    return image.convert("RGB")


def fit_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width): multiples of ``factor``, aspect kept, area within [min_pixels, max_pixels] when possible."""
    rows, columns = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if rows * columns > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        rows = max(factor, math.floor(height / scale / factor) * factor)
        columns = max(factor, math.floor(width / scale / factor) * factor)
    elif rows * columns < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        rows, columns = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return rows, columns


@dataclass(frozen=True)
class ImageTransform:
    """Task image -> float32 (3, H, W) normalised VQ-VAE input, and VQ output -> PIL."""

    factor: int
    min_pixels: int
    max_pixels: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, image) -> torch.Tensor:
        picture = to_rgb(image)
        height, width = fit_size(picture.height, picture.width, self.factor, self.min_pixels, self.max_pixels)
        picture = picture.resize((width, height), PILImage.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        return (pixels - self._column(self.mean)) / self._column(self.std)

    def to_pil(self, pixels: torch.Tensor) -> list[PILImage.Image]:
        """PIL images of float (B, 3, H, W) decoder output in the normalised space, by
        ``Emu3ImageProcessor.postprocess`` with this transform's mean and std (unnormalise, scale
        to 0-255, clip, truncate to uint8), as transformers' Emu3 turns decoded images into pictures."""
        from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

        processor = Emu3ImageProcessor(image_mean=list(self.mean), image_std=list(self.std))
        images = [image for image in pixels.detach().float().cpu()]
        return processor.postprocess(images, return_tensors="PIL.Image.Image")["pixel_values"]

    @staticmethod
    def _column(values: tuple[float, float, float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(3, 1, 1)
