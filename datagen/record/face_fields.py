"""The face parts of a record (schema 1.1): the faces on a person segment and the record's face checks
(:mod:`datagen.record.schema` holds the record; the flags are decided in :mod:`datagen.record.build`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SegmentFace:
    """A face found inside a person segment."""

    box: list[float]  # [x0, y0, x1, y1], pixels of the stored image
    score: float  # the detector's face probability
    size: int  # the box's longer side, px
    inside: float  # share of the box's pixels that are the segment's


@dataclass
class PrimaryFace:
    """The face the source photo was chosen for (FFHQ-wild's ``face_rect``) and what covers it."""

    rect: list[int]  # [x0, y0, x1, y1], whole pixels of the stored image
    segment_id: int | None  # the segment covering most of the rect; None: no segment pixel inside it
    overlap: float  # that segment's share of the rect
    matched_person: bool  # that segment is a person segment a phrase matched


@dataclass
class FaceChecks:
    small_face_px: int
    primary_min_overlap: float
    primary_face: PrimaryFace | None = None  # None: the source gives no face rect
    flags: list[str] = field(default_factory=list)  # in FACE_FLAG_NAMES order

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaceChecks:
        d = dict(d)
        if d.get("primary_face") is not None:
            d["primary_face"] = PrimaryFace(**d["primary_face"])
        return cls(**d)
