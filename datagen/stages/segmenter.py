"""Panoptic segmentation stage: Mask2Former segments for a batch of images (DESIGN §3, step 2).

``PanopticSegmenter`` loads the model named in the profile's ``segmenter`` section (a hub id such
as ``facebook/mask2former-swin-large-coco-panoptic`` or a local folder such as the tiny model)
through :func:`~datagen.stages.model_loading.resolve_model` and runs transformers'
``Mask2FormerForUniversalSegmentation`` + ``post_process_panoptic_segmentation``.

=================================  =============================================================
key                                meaning
=================================  =============================================================
``model``                          hub id or folder (a COCO-panoptic Mask2Former + its processor)
``batch_size``                     images per forward pass (results do not depend on it)
``resolution``                     shortest side the model sees (longest side capped at
                                   ``resolution × 1333 / 800``, Mask2Former's own ratio)
``pad_to``                         ``square`` (one canvas for every image: full batches) or ``none``
``threshold``                      minimum class score of a query to be kept
``mask_threshold``                 binarisation threshold of (score × mask probability)
``overlap_mask_area_threshold``    minimum share of a query's mask it must keep after overlaps
``dtype`` / ``device``             as for the other stages (``auto``: bf16/fp16 on GPU, fp32 on CPU)
=================================  =============================================================

What comes back is at the **stored image's size** (``target_sizes``), whatever the processing
resolution:

* ``segment_map``: ``uint16`` array, ``H × W`` of the image, 0 = no segment, ``1..N`` = segment ids,
  numbered in the order the segments are listed;
* ``segments``: one :class:`SegmentInfo` per id, with the COCO label from the model's own
  ``config.id2label``, ``is_thing``, the tight ``bbox`` ``[x0, y0, x1, y1]`` (x = column, y = row,
  ``x1``/``y1`` exclusive) and ``area`` (pixel count) of its pixels in the map, and the score.

Details that matter:

* **Things and stuff.** A COCO-panoptic label map lists the 80 thing classes first (ids 0–79)
  and then the 53 stuff classes (ids 80–132); this is the order of detectron2's COCO categories,
  which the Hugging Face checkpoints keep. :func:`is_thing` is that rule, and the only place it
  lives; a model whose label map does not have 133 classes is refused at load time.
* **Stuff is fused** as detectron2's panoptic inference does: all masks of one stuff class become
  one segment (score = the highest of the fused masks). This is done here on the unfused output of
  ``post_process_panoptic_segmentation`` (``label_ids_to_fuse=set()``), because that function's
  own fusion re-uses segment ids (after a fused mask its id counter steps back), which would give
  two different segments the same id.
* **Mixed sizes share a batch, on one canvas.** The processor resizes each image on its own
  (shortest side ``resolution``, sides rounded up to its ``size_divisor``); with ``pad_to: square``
  (the default) every image is then padded at the bottom/right to the same square canvas, the
  largest size the processor can produce (``longest_edge`` rounded up), so images of any aspect
  ratio run ``batch_size`` at a time. The canvas depends only on the settings, never on the other
  images of a batch, so a result is the same batched or one at a time: padding does change
  Mask2Former's features (the model has no padding mask: Swin windows, the pixel decoder's
  deformable attention and the decoder's cross-attention all see it), and measured on the tiny
  model, padding each image only to its batch's largest size kept 2–25 % of the pixels' labels.
  Post-processing is padding-aware, as detectron2's ``sem_seg_postprocess``: each image's mask
  logits are cropped to its own valid (unpadded) region before they are resized to its size.
  ``pad_to: none`` pads nothing: images are only batched with images of the same processed size
  (less compute per image, emptier batches on mixed aspect ratios).
* Segments with no pixel left in the map are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from datagen.config import SegmenterSettings
from datagen.stages.model_loading import load_pretrained, pick_device, resolve_model
from datagen.stages.step import ImageModelStep

WHAT = "segmenter (Mask2Former, COCO panoptic)"
COCO_PANOPTIC_NUM_CLASSES = 133
COCO_PANOPTIC_NUM_THINGS = 80
LONG_SIDE_RATIO = 1333 / 800  # Mask2Former's default longest_edge / shortest_edge


def is_thing(category_id: int) -> bool:
    """COCO panoptic: ids 0–79 are things (countable objects), 80–132 are stuff (amorphous regions)."""
    return 0 <= int(category_id) < COCO_PANOPTIC_NUM_THINGS


@dataclass
class SegmentInfo:
    id: int
    category_id: int
    coco_label: str
    is_thing: bool
    bbox: list[int]  # [x0, y0, x1, y1], x = column, y = row, x1/y1 exclusive; tight box of the mask
    area: int
    score: float


@dataclass
class PanopticResult:
    segment_map: np.ndarray  # uint16, H x W of the image, 0 = none
    segments: list[SegmentInfo] = field(default_factory=list)


class PanopticSegmenter:
    """Mask2Former panoptic segmentation: ``segment(images) -> list[PanopticResult]``."""

    def __init__(self, section: SegmenterSettings, device: str | None = None):
        """Load the model of a profile's ``segmenter`` section on ``device`` (else ``section.device``,
        else CUDA when visible)."""
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        model = section.model
        self.model_id = model
        self.batch_size = section.batch_size
        self.resolution = section.resolution
        self.threshold = float(section.threshold)
        self.mask_threshold = float(section.mask_threshold)
        self.overlap_mask_area_threshold = float(section.overlap_mask_area_threshold)
        self.device = pick_device(device or section.device)
        self.pad_to = section.pad_to
        self.processor, self.model, self.dtype = load_pretrained(
            model, WHAT, AutoImageProcessor, Mask2FormerForUniversalSegmentation, self.device, section.dtype
        )
        self.id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        if sorted(self.id2label) != list(range(COCO_PANOPTIC_NUM_CLASSES)):
            raise ValueError(
                f"{WHAT}: model {model!r} has {len(self.id2label)} classes, not COCO panoptic's "
                f"{COCO_PANOPTIC_NUM_CLASSES} (80 things + 53 stuff); use a COCO-panoptic Mask2Former"
            )
        self.size = {
            "shortest_edge": self.resolution,
            "longest_edge": math.ceil(self.resolution * LONG_SIDE_RATIO),
        }
        divisor = int(getattr(self.processor, "size_divisor", 0) or 1)
        side = math.ceil(self.size["longest_edge"] / divisor) * divisor
        self.canvas = (side, side)  # (height, width) every image is padded to with pad_to "square"
        self.forwards = 0  # model forward passes run (for measuring how full the batches are)

    def segment(self, images: Sequence[Image.Image]) -> list[PanopticResult]:
        """One :class:`PanopticResult` per image, in input order.

        With ``pad_to: square`` every image is padded to :attr:`canvas` and the images run
        ``batch_size`` at a time in input order; with ``none`` images of the same processed size run
        together. Either way an image's result does not depend on which other images were passed
        with it (see the module docstring).
        """
        import torch

        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        if self.pad_to == "square":
            groups = [list(range(len(rgb)))]
            pixels = list(self._pixels(rgb, self.canvas))
        else:
            pixels = [self._pixels([im], None)[0] for im in rgb]
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, (_, valid) in enumerate(pixels):
                by_size.setdefault(valid, []).append(i)
            groups = list(by_size.values())

        results: list[PanopticResult | None] = [None] * len(images)
        for indices in groups:
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batch = torch.stack([pixels[i][0] for i in chunk]).to(self.device, self.dtype)
                with torch.inference_mode():
                    out = self.model(pixel_values=batch)
                self.forwards += 1
                # post-processing (upsampling to the image size) stays on the model's device, in fp32
                class_logits = out.class_queries_logits.float()
                mask_logits = out.masks_queries_logits.float()
                padded = tuple(batch.shape[-2:])
                for row, i in enumerate(chunk):
                    valid_logits = _crop_to_valid(mask_logits[row:row + 1], pixels[i][1], padded)
                    results[i] = self._post_process(class_logits[row:row + 1], valid_logits, images[i].size)
        return results  # type: ignore[return-value]

    def _pixels(self, images: list[Image.Image], canvas: tuple[int, int] | None):
        """``[(pixel_values C×H×W, (valid_height, valid_width))]``: the processor's resize and
        normalisation of each image, zero-padded at the bottom/right to ``canvas`` (as the
        processor's own padding does) or left unpadded."""
        import torch

        out = []
        for im in images:
            px = self.processor(images=[im], size=self.size, return_tensors="pt")["pixel_values"][0]
            valid = (int(px.shape[-2]), int(px.shape[-1]))
            if canvas is not None:
                padded = torch.zeros((px.shape[0], *canvas), dtype=px.dtype)
                padded[:, : valid[0], : valid[1]] = px
                px = padded
            out.append((px, valid))
        return out

    def _post_process(self, class_logits, mask_logits, size: tuple[int, int]) -> PanopticResult:
        from transformers.models.mask2former.modeling_mask2former import (
            Mask2FormerForUniversalSegmentationOutput,
        )

        width, height = size
        post = self.processor.post_process_panoptic_segmentation(
            Mask2FormerForUniversalSegmentationOutput(
                class_queries_logits=class_logits, masks_queries_logits=mask_logits
            ),
            threshold=self.threshold,
            mask_threshold=self.mask_threshold,
            overlap_mask_area_threshold=self.overlap_mask_area_threshold,
            label_ids_to_fuse=set(),
            target_sizes=[(height, width)],
        )[0]
        return self._to_result(post["segmentation"], post["segments_info"], size)

    def _to_result(self, segmentation, segments_info: list[dict], size: tuple[int, int]) -> PanopticResult:
        """Fuse stuff per class, renumber ids 1..N, measure bbox and area on the final map."""
        width, height = size
        raw = np.asarray(segmentation.cpu().numpy() if hasattr(segmentation, "cpu") else segmentation)
        raw = raw.astype(np.int64)
        if raw.shape != (height, width):
            raise RuntimeError(f"{WHAT}: post-processing returned a {raw.shape} map for a {width}x{height} image")

        # Group the post-processor's segments into final segments: one per thing, one per stuff class.
        groups: list[dict[str, Any]] = []
        stuff_group: dict[int, dict[str, Any]] = {}
        for info in segments_info:
            label_id = int(info["label_id"])
            score = float(info["score"])
            if not is_thing(label_id) and label_id in stuff_group:
                group = stuff_group[label_id]
                group["raw_ids"].append(int(info["id"]))
                group["score"] = max(group["score"], score)
                continue
            group = {"label_id": label_id, "raw_ids": [int(info["id"])], "score": score}
            groups.append(group)
            if not is_thing(label_id):
                stuff_group[label_id] = group

        lut = np.zeros(max(int(raw.max()), 0) + 1, dtype=np.int64)
        for new_id, group in enumerate(groups, 1):
            for raw_id in group["raw_ids"]:
                if raw_id < len(lut):
                    lut[raw_id] = new_id
        renumbered = np.where(raw > 0, lut[np.clip(raw, 0, None)], 0)
        # drop groups without pixels, then renumber densely 1..N in list order
        areas = np.bincount(renumbered.ravel(), minlength=len(groups) + 1)
        keep = [g for g, group in enumerate(groups, 1) if areas[g] > 0]
        dense = np.zeros(len(groups) + 1, dtype=np.uint16)
        dense[keep] = np.arange(1, len(keep) + 1, dtype=np.uint16)
        segment_map = dense[renumbered].astype(np.uint16)

        boxes = _tight_boxes(segment_map, len(keep))
        areas = np.bincount(segment_map.ravel(), minlength=len(keep) + 1)
        segments = []
        for new_id, old in enumerate(keep, 1):
            group = groups[old - 1]
            label_id = group["label_id"]
            segments.append(
                SegmentInfo(
                    id=new_id,
                    category_id=label_id,
                    coco_label=self.id2label[label_id],
                    is_thing=is_thing(label_id),
                    bbox=boxes[new_id],
                    area=int(areas[new_id]),
                    score=round(group["score"], 6),
                )
            )
        return PanopticResult(segment_map=segment_map, segments=segments)


def _crop_to_valid(mask_logits, valid: tuple[int, int], padded: tuple[int, int]):
    """Keep the part of ``1 × Q × h × w`` mask logits that covers the image's valid ``(height, width)``
    out of the ``padded`` input (the logits are at a fixed fraction of the input size)."""
    h, w = mask_logits.shape[-2:]
    rows = math.ceil(valid[0] * h / padded[0])
    cols = math.ceil(valid[1] * w / padded[1])
    return mask_logits[..., :rows, :cols]


def _tight_boxes(segment_map: np.ndarray, count: int) -> dict[int, list[int]]:
    """``{id: [x0, y0, x1, y1]}`` (x1/y1 exclusive) of ids 1..count in ``segment_map``, in one pass."""
    from scipy import ndimage

    boxes = {}
    for index, slices in enumerate(ndimage.find_objects(segment_map, max_label=count), 1):
        if slices is not None:
            rows, cols = slices
            boxes[index] = [int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)]
    return boxes


def probe_panoptic() -> PanopticResult:
    """A segmentation of :func:`~datagen.stages.step.probe_image`: one ``person`` segment over all of it
    (the known-good input of the stages after the segmenter)."""
    from datagen.config import PERSON_LABEL
    from datagen.stages.step import PROBE_SIZE

    w, h = PROBE_SIZE
    return PanopticResult(
        segment_map=np.ones((h, w), dtype=np.uint16),
        segments=[SegmentInfo(id=1, category_id=0, coco_label=PERSON_LABEL, is_thing=True, bbox=[0, 0, w, h], area=w * h, score=1.0)],
    )


class SegmentStep(ImageModelStep):
    """The build's segmenter stage: a :class:`PanopticResult` per image (or a ``StageFailure``)."""

    name, what = "segmenter", WHAT

    def __init__(self, profile, device: str):
        super().__init__(profile, device)
        self.segmenter = PanopticSegmenter(profile.segmenter, device)

    def run_model(self, images: list) -> list:
        return self.segmenter.segment(images)


def segmenter_labels(segmenter: SegmenterSettings) -> list[str]:
    """Every label the profile's segmenter can emit (its config's ``id2label``), sorted."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(segmenter.model, "segmenter (label set)"))
    return sorted({str(v) for v in config.id2label.values()})
