"""The training target: image and segment-id map brought to ``resolution``² together.

As in FastComposer's ``TrainTransformWithSegmap``: scale so the short side is ``resolution``,
flip both horizontally with probability 0.5, then make the result square — a landscape image is
centre-cropped, a portrait image is scaled so its height fits and padded left/right (black image,
segment id 0). Image and map travel together as torchvision ``tv_tensors.Image`` /
``tv_tensors.Mask``, so every geometric step is one joint call.

``segment_map_resize`` chooses how the id map is resampled:

* ``nearest`` (ours, default): one resize per axis; the map samples the nearest pixel centre
  (``NEAREST_EXACT``, the grid the bilinear image resize uses), so a mask stays over the pixels
  it covered and no id is invented;
* ``upstream``: the released code's steps — torchvision ``NEAREST`` (top-left sampling) for the
  short-side resize and, for portrait images, pad then a *bilinear* resize of image and map
  together, which blends ids along segment borders.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

BILINEAR = TF.InterpolationMode.BILINEAR


def square_target(
    image: torch.Tensor, segment_map: np.ndarray | torch.Tensor, resolution: int, flip: bool,
    segment_map_resize: str = "nearest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``image``: uint8 (3, H, W); ``segment_map``: (H, W) ids. Returns uint8 (3, R, R) and the ids
    (R, R) as :func:`segment_id_tensor` types them."""
    _, h, w = image.shape
    if tuple(segment_map.shape) != (h, w):
        raise ValueError(f"segment map is {segment_map.shape[1]}x{segment_map.shape[0]}, image is {w}x{h}")
    image, ids = tv_tensors.Image(image), tv_tensors.Mask(segment_id_tensor(segment_map))
    if segment_map_resize == "upstream":
        image, ids = _upstream(image, ids, resolution, flip)
    elif segment_map_resize == "nearest":
        image, ids = _nearest(image, ids, resolution, flip)
    else:
        raise ValueError(f"segment_map_resize must be 'nearest' or 'upstream', got {segment_map_resize!r}")
    return image.as_subclass(torch.Tensor).contiguous(), ids.as_subclass(torch.Tensor).contiguous()


def segment_id_tensor(segment_map: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W) segment ids as a tensor torch compares and resizes everywhere: uint8 when every id
    fits (resized natively, ~4x faster), else int32 (torch has few uint16 kernels)."""
    if torch.is_tensor(segment_map) and segment_map.dtype in (torch.uint8, torch.int32):
        return segment_map
    segment_map = np.asarray(segment_map)
    return torch.from_numpy(segment_map.astype(np.uint8 if segment_map.max(initial=0) <= 255 else np.int32))


def _nearest(image: tv_tensors.Image, ids: tv_tensors.Mask, r: int, flip: bool):
    _, h, w = image.shape
    new_w = max(r, round(w * r / h)) if w >= h else max(1, round(w * r / h))
    image = TF.resize(image, [r, new_w], interpolation=BILINEAR, antialias=True)
    ids = TF.resize(ids, [r, new_w], interpolation=TF.InterpolationMode.NEAREST_EXACT)
    if flip:
        image, ids = TF.horizontal_flip(image), TF.horizontal_flip(ids)
    # crop the width to r, centred; a negative left pads with zeros (black, id 0)
    left = (new_w - r) // 2 if new_w >= r else -((r - new_w) // 2)
    return TF.crop(image, 0, left, r, r), TF.crop(ids, 0, left, r, r)


def _upstream(image: tv_tensors.Image, ids: tv_tensors.Mask, r: int, flip: bool):
    image = TF.resize(image, [r], interpolation=BILINEAR, antialias=True)  # short side -> r
    ids = TF.resize(ids, [r], interpolation=TF.InterpolationMode.NEAREST)
    if flip:
        image, ids = TF.horizontal_flip(image), TF.horizontal_flip(ids)
    _, h, w = image.shape
    if h <= w:  # CenterCropOrPadSides: centre crop
        left = (w - h) // 2
        return TF.crop(image, 0, left, h, h), TF.crop(ids, 0, left, h, h)
    # portrait: pad both sides by (h - w) // 2, then resize image *and map* bilinearly to (w, w)
    pad = (h - w) // 2
    stacked = torch.cat([image.as_subclass(torch.Tensor).to(torch.int32), ids.as_subclass(torch.Tensor)[None]])
    stacked = torch.nn.functional.pad(stacked, (pad, pad, 0, 0))
    stacked = TF.resize(stacked, [w, w], interpolation=BILINEAR, antialias=True)  # as a plain tensor: ids blend
    return tv_tensors.Image(stacked[:3].to(torch.uint8)), tv_tensors.Mask(stacked[3])
