"""Face-anchored checks, batched: the faces inside every person segment, and which segment covers
the face the source photo was chosen for.

    checker = FaceChecker(profile.faces)                      # MTCNN, see datagen.stages.faces
    checks = checker.check(images, panoptics, face_rects)     # one FaceCheck per image

(:class:`FaceCheckStep` is the build's stage: after the segmenter, next to the matcher.)

**Faces per person segment.** Every segment labelled ``person`` is cut from the image at its bbox,
grown on every side by ``crop_margin`` x the box's longer side (clipped to the image), and MTCNN
looks for faces in that crop (faces of at least ``min_face_size`` px, scoring at least
``min_score``). A face found there belongs to the segment when at least ``min_inside`` of its box's
pixels are the segment's in the segment map, so a neighbour's face reaching into the crop is not
counted. Each face is kept as its box ``[x0, y0, x1, y1]`` (pixels of the stored image), its score,
its size (the longer side of the box, px) and that share (``inside``); a segment's faces are sorted
best score first.

**Batching.** Each crop is padded (black, bottom and right) to a canvas whose sides come from a
fixed ladder (64 px x powers of sqrt 2: 64, 91, 128, 182, 256, ...), so crops of similar sizes share
a canvas size and go through MTCNN together, ``batch_size`` crops per call. A crop's canvas depends
only on the crop itself, so its faces never depend on which other crops share its batch.

**The primary face.** ``face_rect`` is the face the source was built around (FFHQ-wild's
``in_the_wild.face_rect``, scaled to the stored image with :func:`stored_rect`; ``None`` for a
source without one, such as an image folder). It is taken as whole pixels (outer bounds, clipped to
the image); the segment with the most pixels inside it covers it (``overlap``: that segment's share of
the rect; ties go to the lower id). No segment pixel inside it: no covering segment, overlap 0.

What the findings mean for a sample (the flags) is decided where the record is built, once the
matches are known (:func:`datagen.record.build.face_flags`); this stage carries the thresholds for
it (``small_face_px``, ``primary_min_overlap``) in each :class:`FaceCheck`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from datagen.config import PERSON_LABEL
from datagen.stages.step import Step

if TYPE_CHECKING:
    from datagen.config import FacesSettings
    from datagen.stages.segmenter import PanopticResult

CANVAS_BASE = 64  # the smallest canvas side; the ladder goes up by sqrt(2) from here
MTCNN_MIN_SIDE = 12  # MTCNN's P-net window: a crop thinner than this holds no face it can find
BOX_DIGITS, SCORE_DIGITS, SHARE_DIGITS = 1, 6, 4  # rounding of what a record stores


@dataclass(frozen=True)
class FoundFace:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the stored image
    score: float  # MTCNN's face probability
    size: int  # the longer side of the box, px
    inside: float  # share of the box's pixels that are the segment's


@dataclass(frozen=True)
class PrimaryCover:
    rect: tuple[int, int, int, int]  # the face rect in whole pixels of the stored image
    segment_id: int | None  # the segment covering most of it; None: no segment pixel inside it
    overlap: float  # that segment's share of the rect


@dataclass
class FaceCheck:
    """One image's findings. ``faces`` has every person segment's id, with an empty list when no face."""

    faces: dict[int, list[FoundFace]] = field(default_factory=dict)
    primary: PrimaryCover | None = None  # None: the source gives no face rect
    small_face_px: int = 0
    primary_min_overlap: float = 0.0


def canvas_side(n: int) -> int:
    """The smallest ladder value (64 x sqrt(2)^k) holding ``n`` px."""
    k = 0
    while math.ceil(CANVAS_BASE * 2 ** (k / 2)) < n:
        k += 1
    return math.ceil(CANVAS_BASE * 2 ** (k / 2))


def stored_rect(rect: Sequence[float] | None, original_size: Sequence[int], stored_size: Sequence[int]) -> list[float] | None:
    """A face rect ``[x0, y0, x1, y1]`` of the source image in pixels of the stored (downscaled) image."""
    if rect is None:
        return None
    sx = stored_size[0] / original_size[0]
    sy = stored_size[1] / original_size[1]
    return [rect[0] * sx, rect[1] * sy, rect[2] * sx, rect[3] * sy]


def primary_cover(rect: Sequence[float], segment_map: np.ndarray) -> PrimaryCover:
    """Which segment covers the face rect (see the module doc)."""
    h, w = segment_map.shape
    x0, y0 = max(0, math.floor(rect[0])), max(0, math.floor(rect[1]))
    x1, y1 = min(w, math.ceil(rect[2])), min(h, math.ceil(rect[3]))
    whole = (int(x0), int(y0), int(max(x0, x1)), int(max(y0, y1)))
    if x1 <= x0 or y1 <= y0:
        return PrimaryCover(whole, None, 0.0)
    region = segment_map[y0:y1, x0:x1]
    counts = np.bincount(region.ravel().astype(np.int64))
    counts[0] = 0
    if counts.max(initial=0) == 0:
        return PrimaryCover(whole, None, 0.0)
    sid = int(np.argmax(counts))
    return PrimaryCover(whole, sid, round(float(counts[sid]) / region.size, SHARE_DIGITS))


class FaceChecker:
    """``check(images, panoptics, face_rects)`` -> one :class:`FaceCheck` per image (module doc)."""

    def __init__(self, section: FacesSettings, device: str | None = None):
        from datagen.stages.faces import FaceDetector

        self.section = section
        self.detector = FaceDetector(section.detector, device or section.device, min_face_size=section.min_face_size,
                                     min_score=section.min_score)
        self.model_ref = section.detector

    def check(self, images: Sequence[Any], panoptics: Sequence[PanopticResult],
              face_rects: Sequence[Sequence[float] | None] | None = None) -> list[FaceCheck]:
        """``face_rects[i]``: image i's face rect in pixels of ``images[i]``, or ``None``."""
        s = self.section
        face_rects = list(face_rects) if face_rects is not None else [None] * len(images)
        if not len(images) == len(panoptics) == len(face_rects):
            raise ValueError(f"face checks: {len(images)} images, {len(panoptics)} segmentations and "
                             f"{len(face_rects)} face rects; they must pair up")
        out: list[FaceCheck] = []
        crops: list[tuple[int, int, tuple[int, int, int, int], np.ndarray]] = []  # (image, segment id, crop box, canvas)
        for i, (image, pan, rect) in enumerate(zip(images, panoptics, face_rects, strict=True)):
            rgb = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
            if pan.segment_map.shape != (rgb.height, rgb.width):
                raise ValueError(f"face checks: image {i} is {rgb.width}x{rgb.height} but its segment map is "
                                 f"{pan.segment_map.shape[1]}x{pan.segment_map.shape[0]}")
            check = FaceCheck(small_face_px=s.small_face_px, primary_min_overlap=s.primary_min_overlap)
            if rect is not None:
                check.primary = primary_cover(rect, pan.segment_map)
            for seg in pan.segments:
                if seg.coco_label != PERSON_LABEL:
                    continue
                check.faces[int(seg.id)] = []
                box = self._crop_box(seg.bbox, rgb.size)
                cw, ch = box[2] - box[0], box[3] - box[1]
                if min(cw, ch) < max(MTCNN_MIN_SIDE, s.min_face_size):
                    continue  # too small to hold a face MTCNN looks for
                canvas = np.zeros((canvas_side(ch), canvas_side(cw), 3), dtype=np.uint8)
                canvas[:ch, :cw] = np.asarray(rgb.crop(box))
                crops.append((i, int(seg.id), box, canvas))
            out.append(check)

        found = self._detect([c[3] for c in crops])
        for (i, sid, box, _), faces in zip(crops, found, strict=True):
            seg_map = panoptics[i].segment_map
            kept = []
            for f in faces:
                face = self._placed(f.box, f.score, box, seg_map, sid)
                if face is not None:
                    kept.append(face)
            out[i].faces[sid] = sorted(kept, key=lambda f: (-f.score, f.box))
        return out

    def _crop_box(self, bbox: Sequence[int], size: tuple[int, int]) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = (int(v) for v in bbox)
        m = self.section.crop_margin * max(x1 - x0, y1 - y0)
        return (max(0, math.floor(x0 - m)), max(0, math.floor(y0 - m)),
                min(size[0], math.ceil(x1 + m)), min(size[1], math.ceil(y1 + m)))

    def _detect(self, canvases: list[np.ndarray]) -> list[list]:
        """MTCNN on every canvas: same-size canvases together, ``batch_size`` per call, in a fixed order."""
        out: list[list] = [[] for _ in canvases]
        by_size: dict[tuple[int, ...], list[int]] = {}
        for j, c in enumerate(canvases):
            by_size.setdefault(c.shape, []).append(j)
        step = self.section.batch_size
        for indices in by_size.values():
            for start in range(0, len(indices), step):
                batch = indices[start:start + step]
                for j, faces in zip(batch, self.detector.detect([canvases[j] for j in batch], crops=False), strict=True):
                    out[j] = faces
        return out

    def _placed(self, box, score: float, crop: tuple[int, int, int, int], seg_map: np.ndarray,
                sid: int) -> FoundFace | None:
        """A face found in a crop's canvas, clipped to the crop and placed in the stored image's pixels;
        ``None`` when it is not the segment's."""
        ox, oy, cw, ch = crop[0], crop[1], crop[2] - crop[0], crop[3] - crop[1]
        x0, y0 = max(0.0, float(box[0])) + ox, max(0.0, float(box[1])) + oy
        x1, y1 = min(float(cw), float(box[2])) + ox, min(float(ch), float(box[3])) + oy
        if x1 - x0 < 1 or y1 - y0 < 1:
            return None
        px0, py0, px1, py1 = math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
        inside = float(np.mean(seg_map[py0:py1, px0:px1] == sid))
        if inside < self.section.min_inside:
            return None
        return FoundFace(
            box=tuple(round(v, BOX_DIGITS) for v in (x0, y0, x1, y1)),
            score=round(float(score), SCORE_DIGITS),
            size=int(round(max(x1 - x0, y1 - y0))),
            inside=round(inside, SHARE_DIGITS),
        )


class FaceCheckStep(Step):
    """The build's face stage: a :class:`FaceCheck` per image (or a ``StageFailure``). The checker
    batches person-segment crops itself (``faces.batch_size`` per MTCNN call), so a chunk is one
    call; an image fails alone. The face rect (FFHQ-wild metadata) is scaled to the stored image."""

    name = "faces"

    def __init__(self, profile, device: str):
        super().__init__(profile, device)
        self.checker = FaceChecker(profile.faces, device)

    def process(self, loaded: list, panoptic: list) -> list:
        from datagen.stages.failures import in_batches
        from datagen.stages.segmenter import probe_panoptic
        from datagen.stages.step import labels_of, probe_image

        inputs = [
            (li.image, pan, stored_rect((li.item.meta or {}).get("face_rect"), li.original_size, li.image.size))
            for li, pan in zip(loaded, panoptic, strict=True)
        ]

        def run(batch: list) -> list:
            return self.checker.check(*(list(column) for column in zip(*batch, strict=True)))

        return in_batches(self.name, run, inputs, labels_of(loaded), max(1, len(inputs)),
                          lambda: (probe_image(), probe_panoptic(), None))

    @classmethod
    def model_ids(cls, profile) -> dict[str, str]:
        return {"face_detector": profile.faces.detector}

    @classmethod
    def check_models(cls, profile) -> None:
        from datagen.stages.faces import FaceDetector

        FaceDetector.resolve(profile.faces.detector)  # 'mtcnn' (inside facenet-pytorch) or a folder of its three nets
