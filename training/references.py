"""Cross-image references for the trainer (``--reference cross-image | mixed:P``): the crop fed to
the image encoder comes from another photo of the subject's identity.

The run's reference set (:mod:`datagen.identity.references`: masked crops, at most 8 per identity)
is read once into memory when the loader starts (an Arrow table: loader processes forked from it
share its buffers), so streaming stays streaming: no random access into the shard tars. A subject
in the set's ``targets`` gets, with probability ``share``, a crop of its identity drawn from another
photo; one that is not (no identity, or no other photo) keeps its own crop and is counted as a
fallback, which the training log reports. The crop goes through the same cropper as the subject's
own (zoom-in plan, noise outside the mask, pad, resize) and the same augmentations; the localization
loss keeps the target's own mask.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from datagen.identity.references import read_reference_set
from datagen.training_settings import reference_share

REFERENCE_ID = 1  # the segment id of the crop's mask


class CrossImageReferences:
    def __init__(self, path: str, share: float):
        crops, targets = read_reference_set(path)
        self.share = float(share)
        self.crops = crops
        self.keys = crops.column("key").to_pylist()
        self.by_identity: dict[int, list[int]] = {}
        for row, identity in enumerate(crops.column("identity").to_pylist()):
            self.by_identity.setdefault(identity, []).append(row)
        self.identity_of = {(k, s): i for k, s, i in zip(*(targets.column(c).to_pylist()
                                                           for c in ("key", "segment_id", "identity")), strict=True)}

    @classmethod
    def from_config(cls, cfg) -> CrossImageReferences | None:
        """The references a trainer config asks for (None with ``reference: same-image``)."""
        share = reference_share(cfg.reference)
        return cls(cfg.reference_set, share) if share > 0 else None

    def pick(self, key: str, segment_id: int, rng: random.Random) -> int | None | bool:
        """For the subject ``segment_id`` of sample ``key``: a crop row of its identity from another
        photo; ``None`` when it draws its own crop (``1 - share``); ``False`` when it has none (a fallback)."""
        if self.share < 1.0 and rng.random() >= self.share:
            return None
        identity = self.identity_of.get((key, int(segment_id)))
        rows = [r for r in self.by_identity.get(identity, ()) if self.keys[r] != key]
        return rng.choice(rows) if rows else False

    def source(self, row: int) -> tuple[torch.Tensor, np.ndarray, list[int]]:
        """Crop ``row`` decoded: (uint8 (3, h, w), (h, w) map with :data:`REFERENCE_ID` on the
        subject, its box ``[0, 0, w, h]``)."""
        jpg = self.crops.column("jpg")[row].as_py()
        mask = self.crops.column("mask")[row].as_py()
        with Image.open(io.BytesIO(jpg)) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
        with Image.open(io.BytesIO(mask)) as im:
            segment_map = (np.asarray(im.convert("L")) > 0).astype(np.uint16) * REFERENCE_ID
        return image, segment_map, [0, 0, image.shape[2], image.shape[1]]
