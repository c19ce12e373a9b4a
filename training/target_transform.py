"""The training target: image and segment-id map brought to ``resolution``² together.

As in FastComposer's ``TrainTransformWithSegmap``: scale so the short side is ``resolution``,
flip both horizontally with probability 0.5, then make the result square — a landscape image is
centre-cropped, a portrait image is scaled so its height fits and padded left/right (black image,
segment id 0). Each is a single resize here: bilinear with antialiasing for the image, nearest
(pixel-centre sampling) for the segment map, so that a mask stays over the pixels it covered.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


def nearest_resize(segment_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize sampling at pixel centres (the grid that bilinear resize uses)."""
    h, w = segment_map.shape
    rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.int64), w - 1)
    return segment_map[rows[:, None], cols[None, :]]


def square_target(
    image: torch.Tensor, segment_map: np.ndarray, resolution: int, flip: bool
) -> tuple[torch.Tensor, np.ndarray]:
    """``image``: uint8 (3, H, W); ``segment_map``: (H, W). Returns uint8 (3, R, R) and (R, R)."""
    _, h, w = image.shape
    if segment_map.shape != (h, w):
        raise ValueError(f"segment map is {segment_map.shape[1]}x{segment_map.shape[0]}, image is {w}x{h}")
    if w >= h:  # landscape or square: short side -> R, centre-crop the width
        new_h, new_w = resolution, max(resolution, round(w * resolution / h))
    else:  # portrait: height -> R, pad the width
        new_h, new_w = resolution, max(1, round(w * resolution / h))
    image = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    segment_map = nearest_resize(segment_map, new_h, new_w)
    if flip:
        image = image.flip(-1)
        segment_map = segment_map[:, ::-1]
    if new_w > resolution:
        left = (new_w - resolution) // 2
        image = image[:, :, left : left + resolution]
        segment_map = segment_map[:, left : left + resolution]
    elif new_w < resolution:
        left = (resolution - new_w) // 2
        right = resolution - new_w - left
        image = torch.nn.functional.pad(image, (left, right, 0, 0), value=0)
        segment_map = np.pad(segment_map, ((0, 0), (left, right)), constant_values=0)
    return image.contiguous(), np.ascontiguousarray(segment_map)
