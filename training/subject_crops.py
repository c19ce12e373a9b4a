"""The image of one subject as the vision encoder sees it (DESIGN §6, FastComposer's object transforms).

From the stored (full-size) image: crop the segment's bbox, replace every pixel outside the
segment with uniform random noise, zoom in (below), pad to a square (black), resize to the image
processor's crop size. Output: uint8 (3, S, S). The augmentations that follow (rotation, colour,
blur, grayscale, flip, elastic) are :mod:`training.subject_augment`'s, run on all subjects of an
example at once in the loader, or on the whole batch on the training device.

Where the crops are augmented on the training device, they are also cut there
(:func:`cut_on_device`): the loader validates each subject's box and draws its zoom-in
(:meth:`SubjectCropper.plan`) and hands over the decoded image and segment map; the training step
fills the noise, pads and resizes the whole batch's crops on its device. Same operations, same
distribution (the noise comes from torch's generator instead of numpy's).

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

    def plan(self, segment_map: np.ndarray, segment_id: int, bbox: list[int]) -> list[int]:
        """The box ``[x0, y0, x1, y1]`` the crop is cut from: the segment's bbox, or with p = 0.5
        (zoom on) the zoom-in's part of it. Raises ValueError when the segment has no pixel inside
        its bbox."""
        x0, y0, x1, y1 = bbox
        inside = segment_map[y0:y1, x0:x1] == segment_id
        if inside.shape != (y1 - y0, x1 - x0) or not inside.any():
            raise ValueError(f"segment {segment_id} has no pixel inside its bbox {list(bbox)}")
        if self.zoom and self.rng.random() < ZOOM_P:
            # drawn before the noise, so a zoomed crop noises only the square it keeps
            y1 = y0 + zoom_in(inside[None]).shape[1]
        return [x0, y0, x1, y1]

    def crop(self, image: torch.Tensor, segment_map: np.ndarray, segment_id: int, box: list[int]) -> torch.Tensor:
        """The box's pixels with background noise: uint8 (3, y1 - y0, x1 - x0)."""
        x0, y0, x1, y1 = box
        patch = image[:, y0:y1, x0:x1].numpy()
        inside = segment_map[y0:y1, x0:x1] == segment_id
        # uniform bytes from numpy's generator, segment pixels copied over them: ~4x faster than
        # torch.randint + torch.where on uint8
        out = np.frombuffer(bytearray(self.rng.bytes(patch.size)), dtype=np.uint8).reshape(patch.shape)
        np.copyto(out, patch, where=inside[None])
        return torch.from_numpy(out)

    def __call__(self, image: torch.Tensor, segment_map: np.ndarray, segment_id: int, box: list[int]) -> torch.Tensor:
        """The crop of a box from :meth:`plan`: noise-filled, padded, resized: uint8 (3, S, S)."""
        return self.finish(self.crop(image, segment_map, segment_id, box))

    def finish(self, patch: torch.Tensor) -> torch.Tensor:
        """Pad square, resize to the crop size: uint8 (3, S, S)."""
        return finish_crop(patch, self.size)


def finish_crop(patch: torch.Tensor, size: int) -> torch.Tensor:
    """Pad square (black), resize to ``size``² (bilinear, antialiased): uint8 (3, size, size) on
    ``patch``'s device."""
    patch = pad_to_square(patch)
    return TF.resize(patch, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def cut_on_device(images: list[torch.Tensor], segment_maps: list[torch.Tensor], boxes: torch.Tensor,
                  ids: torch.Tensor, valid: torch.Tensor, size: int, device: torch.device | str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The batch's subject crops cut on ``device``: ``images[b]`` uint8 (3, H, W) and
    ``segment_maps[b]`` (H, W) of example b; ``boxes`` (B, N, 4) from :meth:`SubjectCropper.plan`,
    ``ids`` (B, N) segment ids, ``valid`` (B, N). Returns uint8 (B, N, 3, size, size), zeros
    where ``valid`` is False. ``generator`` (on ``device``) draws the noise."""
    b_size, n_slots = valid.shape
    out = torch.zeros(b_size, n_slots, 3, size, size, dtype=torch.uint8, device=device)
    box_list, id_list = boxes.tolist(), ids.tolist()  # read once (on a GPU: one sync each, not one per crop)
    slots = valid.tolist()
    for b in range(b_size):
        if not any(slots[b]):
            continue
        image = images[b].to(device, non_blocking=True)  # one copy per example; the crops are views of it
        segment_map = segment_maps[b].to(device, non_blocking=True)
        for n in range(n_slots):
            if not slots[b][n]:
                continue
            x0, y0, x1, y1 = box_list[b][n]
            patch = image[:, y0:y1, x0:x1]
            inside = segment_map[y0:y1, x0:x1] == id_list[b][n]
            noise = torch.randint(0, 256, patch.shape, dtype=torch.uint8, device=device, generator=generator)
            out[b, n] = finish_crop(torch.where(inside, patch, noise), size)
    return out
