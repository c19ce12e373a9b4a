"""The crop of a segment that the matcher's CLIP sees (see :mod:`datagen.stages.matcher`): the
segment's box, pixels outside its mask made the CLIP normalisation mean, padded to a square."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def fill_colour(mean: Sequence[float]) -> np.ndarray:
    """The neutral grey (uint8 RGB) that the CLIP normalisation maps to ~0."""
    return np.array([round(255 * m) for m in mean], dtype=np.uint8)


def segment_crop(image: np.ndarray, segment_map: np.ndarray, segment_id: int, bbox: Sequence[int], fill: np.ndarray) -> np.ndarray:
    """The square uint8 RGB crop of one segment (see the module docstring).

    ``image`` H x W x 3 uint8, ``segment_map`` H x W; ``bbox`` ``[x0, y0, x1, y1]`` (x1/y1 exclusive).
    Pixels in the box but outside the mask, and the square padding, are ``fill``.
    """
    x0, y0, x1, y1 = (int(v) for v in bbox)
    width, height = x1 - x0, y1 - y0
    side = max(width, height)
    # Work on (rows, cols * 3) views: filling by a pre-tiled row and a 2-D copyto mask are far
    # faster than broadcasting a 3-vector or boolean fancy indexing on H x W x 3 arrays.
    flat = np.empty((side, side * 3), dtype=np.uint8)
    flat[:] = np.tile(np.asarray(fill, dtype=np.uint8), side)
    top, left = (side - height) // 2, (side - width) // 2
    inside = np.repeat(segment_map[y0:y1, x0:x1] == segment_id, 3, axis=1)
    box = np.ascontiguousarray(image[y0:y1, x0:x1]).reshape(height, width * 3)
    np.copyto(flat[top:top + height, 3 * left:3 * (left + width)], box, where=inside)
    out = flat.reshape(side, side, 3)
    return out
