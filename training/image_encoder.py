"""The subject image encoder: a CLIP vision model with projection, fed subject crops.

Crops arrive as (B, N, 3, S, S), uint8 or float in [0, 1]; they are resized if S differs from the model's
image size, normalised with the image processor's mean and std (read from the model folder's
``preprocessor_config.json``), and encoded to the projected image embedding (B, N, d).
"""

from __future__ import annotations

import torch
from torch import nn


def processor_geometry(processor) -> tuple[int, list[float], list[float]]:
    """(crop size, mean, std) from a CLIP image processor's config."""
    crop = processor.crop_size
    height = crop["height"] if isinstance(crop, dict) else getattr(crop, "height", None)
    width = crop["width"] if isinstance(crop, dict) else getattr(crop, "width", None)
    if not height or height != width:
        raise ValueError(f"image processor crop_size must be square, got {crop}")
    return int(height), list(processor.image_mean), list(processor.image_std)


class SubjectImageEncoder(nn.Module):
    def __init__(self, vision_model, mean: list[float], std: list[float]):
        """``vision_model``: a ``CLIPVisionModelWithProjection``."""
        super().__init__()
        self.vision_model = vision_model
        self.image_size = int(vision_model.config.image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return int(self.vision_model.config.projection_dim)

    def blocks(self) -> nn.ModuleList:
        """The vision transformer's blocks (FastComposer fine-tunes the last two)."""
        return self.vision_model.vision_model.encoder.layers

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, n = pixels.shape[:2]
        x = pixels.reshape(b * n, *pixels.shape[2:])
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, (self.image_size, self.image_size), mode="bilinear", antialias=True)
        x = (x - self.mean) / self.std
        dtype = next(self.vision_model.parameters()).dtype
        embeds = self.vision_model(pixel_values=x.to(dtype)).image_embeds
        return embeds.view(b, n, -1)
