"""The image of one subject as the vision encoder sees it (DESIGN §6, FastComposer's object transforms).

From the stored (full-size) image: crop the segment's bbox, replace every pixel outside the
segment with uniform random noise, zoom in (below), pad to a square (black), resize to the image
processor's crop size. Output: uint8 (3, S, S). The augmentations that follow (rotation, colour,
blur, grayscale, flip, elastic) are :mod:`training.subject_augment`'s, run on all subjects of an
example at once in the loader, or on the whole batch on the training device.

Zoom-in, as released (``RandomZoomIn`` inside ``RandomApply(p=0.5)``): upscale by z ∈ [1, 2],
then, only if the crop is taller than wide, keep its top square. The resize to S that follows
undoes the upscale, so the operation is: with p = 0.5, a portrait crop keeps its top w × w
square; landscape and square crops are unchanged. We skip the upscale (it changes nothing but a
second resampling of the pixels).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

ZOOM_P = 0.5


def zoom_in(patch: torch.Tensor) -> torch.Tensor:
    """Upstream's zoom-in once drawn: a portrait (3, h, w) crop keeps its top (w × w) square."""
    _, h, w = patch.shape
    return patch[:, :w, :] if h > w else patch


def pad_to_square(image: torch.Tensor) -> torch.Tensor:
    """Black padding on both sides of the short axis (upstream's ``PadToSquare``)."""
    _, h, w = image.shape
    if h == w:
        return image
    if h > w:
        left = (h - w) // 2
        return torch.nn.functional.pad(image, (left, h - w - left, 0, 0), value=0)
    top = (w - h) // 2
    return torch.nn.functional.pad(image, (0, 0, top, w - h - top), value=0)


class SubjectCropper:
    def __init__(self, size: int, zoom: bool = True, seed: int | None = None):
        self.size = int(size)
        self.zoom = zoom
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def crop(self, image: torch.Tensor, segment_map: np.ndarray, segment_id: int, bbox: list[int]) -> torch.Tensor:
        """The bbox crop with background noise: uint8 (3, y1 - y0, x1 - x0). Raises ValueError when
        the segment has no pixel inside its bbox."""
        x0, y0, x1, y1 = bbox
        patch = image[:, y0:y1, x0:x1].numpy()
        inside = segment_map[y0:y1, x0:x1] == segment_id
        if patch.shape[1:] != inside.shape or not inside.any():
            raise ValueError(f"segment {segment_id} has no pixel inside its bbox {list(bbox)}")
        # uniform bytes from numpy's generator, segment pixels copied over them: ~4x faster than
        # torch.randint + torch.where on uint8
        out = np.frombuffer(bytearray(self.rng.bytes(patch.size)), dtype=np.uint8).reshape(patch.shape)
        np.copyto(out, patch, where=inside[None])
        return torch.from_numpy(out)

    def __call__(self, image: torch.Tensor, segment_map: np.ndarray, segment_id: int, bbox: list[int]) -> torch.Tensor:
        patch = self.crop(image, segment_map, segment_id, bbox)
        if self.zoom and self.rng.random() < ZOOM_P:
            patch = zoom_in(patch)
        return self.finish(patch)

    def finish(self, patch: torch.Tensor) -> torch.Tensor:
        """Pad square, resize to the crop size: uint8 (3, S, S)."""
        patch = pad_to_square(patch)
        return TF.resize(patch, [self.size, self.size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
