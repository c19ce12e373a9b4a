"""What one record's face checks say, as the numbers people audit and filter on.

Pure bookkeeping over a :class:`~datagen.record.schema.Record` (no model, no I/O), shared by the
manifest tables, the report and the export filters. The flags themselves are stored in the record
(``face_checks.flags``, defined in :mod:`datagen.record.schema`); this reads them and the faces
behind them. A record whose faces were not checked (schema 1.0, or the face stage did not run)
has ``checked`` False and every other value ``None`` / empty: unknown, not "no problem".

* ``faces_per_person_segment``: the number of faces inside each person segment, in segment order;
* ``matched_face_sizes``: for each matched person segment with a face, its largest face's size (px);
* ``min_matched_face_size``: the smallest of those (what ``--min-face-size`` compares);
* ``primary_face_*``: the segment covering the source's face rect, its label and its share of the rect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datagen.record.schema import FACE_FLAG_NAMES, PERSON_LABEL, Record


@dataclass
class FaceQuality:
    checked: bool
    n_faces: int | None = None  # faces inside person segments
    faces_per_person_segment: list[int] = field(default_factory=list)
    matched_face_sizes: list[int] = field(default_factory=list)
    min_matched_face_size: int | None = None
    primary_face_segment: int | None = None
    primary_face_label: str | None = None
    primary_face_overlap: float | None = None
    flags: dict[str, bool | None] = field(default_factory=lambda: dict.fromkeys(FACE_FLAG_NAMES))


def face_quality(record: Record) -> FaceQuality:
    fc = record.face_checks
    if fc is None:
        return FaceQuality(checked=False)
    persons = [s for s in record.segments if s.coco_label == PERSON_LABEL]
    counts = [len(s.faces or []) for s in persons]
    sizes = [max(f.size for f in s.faces) for s in persons if s.matched and s.faces]
    q = FaceQuality(
        checked=True,
        n_faces=sum(counts),
        faces_per_person_segment=counts,
        matched_face_sizes=sizes,
        min_matched_face_size=min(sizes) if sizes else None,
        flags={name: name in fc.flags for name in FACE_FLAG_NAMES},
    )
    pf = fc.primary_face
    if pf is not None:
        label = {s.id: s.coco_label for s in record.segments}.get(pf.segment_id)
        q.primary_face_segment, q.primary_face_label, q.primary_face_overlap = pf.segment_id, label, pf.overlap
    return q
