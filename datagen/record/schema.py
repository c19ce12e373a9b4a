"""The output record: one annotated sample, as stored in a shard's ``.json`` member.

The FastComposer contract (DESIGN §4) is kept exactly: ``caption`` and a ``segments`` list whose
items carry ``id``, ``coco_label``, ``bbox`` ([x0, y0, x1, y1], pixels of the stored image) and,
only when matched to a noun phrase, ``word``, ``start`` and ``end`` (end exclusive).

**Unmatched segments** are kept in ``segments`` (their pixels are in the segment-id map) but carry
*no* ``word`` / ``start`` / ``end`` keys at all (not ``null``), so a consumer tells subjects apart
with ``"end" in segment`` (our trainer does). FastComposer's released loader filters segments by
``coco_label`` only and then reads ``end`` from each, so ``subject-ffhq export --format
fastcomposer`` lists only the subjects (matched segments of the object types) under ``segments`` and
moves the rest, unchanged, to ``other_segments`` (matched) and ``unmatched_segments``.

Everything else is for auditing: the raw caption, every phrase, the score matrices the greedy
matcher used, the unmatched phrases and person segments, provenance and model ids.

**Face checks** (schema 1.1, :mod:`datagen.stages.face_checker`): every ``person`` segment carries
``faces``, the faces MTCNN found inside it (``box`` [x0, y0, x1, y1] in pixels of the stored image,
``score``, ``size`` = the box's longer side in px, ``inside`` = the share of the box that is the
segment's), best score first, ``[]`` when none; other segments carry no ``faces`` key. The record's
``face_checks`` holds the thresholds used, ``primary_face`` (the source's face rect in pixels of the
stored image, the segment covering most of it, that share, and whether that segment is a matched
person; ``null`` for a source without a face rect) and ``flags``, in :data:`FACE_FLAG_NAMES` order:

* ``merged_persons``: a person segment holds two faces or more (touching people merged into one mask);
* ``faceless_person``: a matched person segment holds no face (a back view, a crop, a false person);
* ``small_face``: a matched person segment's largest face is smaller than ``small_face_px``;
* ``primary_face_unsegmented``: the face rect is not covered by a person segment (the segment covering
  most of it is not a person, or covers less than ``primary_min_overlap`` of it, or there is none);
* ``primary_face_unmatched``: it is covered by a person segment that no phrase matched.

**Phrase grounding** (``grounding: sam3``, docs/grounding.md): a segment may carry ``label_vocab``
(``coco`` or ``open``: which vocabulary its ``coco_label`` is from; ``category_id`` null for open).

**Versions.** This code writes :data:`SCHEMA_VERSION` (1.2: ``identity_faces``, see
:mod:`datagen.record.identity_faces`) and reads every version in :data:`READABLE_VERSIONS`. A ``1.0``
record has no ``faces``/``face_checks``, a 1.1 one no ``identity_faces``; each reads back as it was.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from datagen.config import PERSON_LABEL
from datagen.record.face_fields import FaceChecks, SegmentFace
from datagen.record.identity_faces import (
    OLDER_VERSIONS,
    IdentityChecks,
    ImageFace,
    check_identity_checks,
    check_identity_faces,
)

SCHEMA_VERSION = "1.2"
READABLE_VERSIONS = ("1.0", "1.1", "1.2")  # 1.0: before the face checks; 1.1: before identity_faces
FACE_FLAG_NAMES = (
    "merged_persons", "faceless_person", "small_face", "primary_face_unsegmented", "primary_face_unmatched",
)
SPLITS = ("train", "test")
SOURCES = ("ffhq-wild", "folder", "img2dataset")
OPTIONAL_PROVENANCE = ("source_tar", "source_key", "alt_text")  # absent from a record unless set
CONTRACT_FIELDS = frozenset((
    "schema_version", "key", "caption", "caption_raw", "width", "height", "segments", "phrases", "scores",
    "unmatched_phrases", "unmatched_person_segments", "caption_flags", "provenance", "split", "models", "face_checks",
    "identity_faces", "identity_checks",
))  # what Record.to_dict writes; any other top-level field is a stage's (Record.extra)


class RecordError(ValueError):
    """A record violates the schema. The message names the offending field."""

    def __init__(self, field_path: str, problem: str, key: str | None = None):
        self.field_path = field_path
        self.problem = problem
        where = f"record {key!r}: " if key else "record: "
        super().__init__(f"{where}field '{field_path}' {problem}")


@dataclass
class Segment:
    """One panoptic segment. ``word``/``start``/``end`` are set only when a phrase is matched."""

    id: int
    coco_label: str
    category_id: int
    is_thing: bool
    bbox: list[int]  # [x0, y0, x1, y1], x = column, y = row, x1/y1 exclusive
    area: int
    score: float
    word: str | None = None
    start: int | None = None
    end: int | None = None
    match_score: float | None = None  # CLIP × SBERT product of the match
    clip_sim: float | None = None
    sbert_sim: float | None = None
    faces: list[SegmentFace] | None = None  # person segments of a face-checked record; None: not looked at
    label_vocab: str | None = None  # grounding sam3: "coco" or "open" (datagen.labels); None: COCO panoptic

    @property
    def matched(self) -> bool:
        return self.end is not None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.matched:
            for k in ("word", "start", "end", "match_score", "clip_sim", "sbert_sim"):
                d.pop(k)
        for k in ("faces", "label_vocab"):  # absent, not null, where they do not apply
            if d[k] is None:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        d = dict(d)
        if d.get("faces") is not None:
            d["faces"] = [SegmentFace(**f) for f in d["faces"]]
        return cls(**d)


@dataclass
class Phrase:
    """A noun phrase of the (expanded) caption; ``caption[start:end] == text``."""

    text: str
    start: int
    end: int
    segment_id: int | None = None  # the segment it was matched to, if any


@dataclass
class MatchScores:
    """The matrices the greedy matcher used: rows = phrases (record order), columns = segment ids."""

    segment_ids: list[int] = field(default_factory=list)
    clip: list[list[float]] = field(default_factory=list)
    sbert: list[list[float]] = field(default_factory=list)
    product: list[list[float]] = field(default_factory=list)
    min_score: float = 0.0


@dataclass
class Provenance:
    """Where the source photo came from."""

    source: str  # "ffhq-wild", "folder" or "img2dataset"
    source_id: str  # FFHQ index as a decimal string; for a folder, the running index in sorted path order
    path: str  # path relative to the source root
    pixel_md5: str  # md5 of the decoded RGB pixels (before resize)
    original_size: list[int]  # [w, h] of the source image
    license: str | None = None
    license_url: str | None = None
    author: str | None = None
    photo_url: str | None = None
    photo_title: str | None = None
    face_rect: list[float] | None = None
    duplicate_of: str | None = None  # source_id of the first photo with the same pixels
    # img2dataset collections only (written only when set, so other sources' records keep their bytes):
    source_tar: str | None = None  # the source tar, relative to the source root
    source_key: str | None = None  # the sample's key in it
    alt_text: str | None = None  # the collection's own caption (<key>.txt), kept beside ours

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k not in OPTIONAL_PROVENANCE}


@dataclass
class Record:
    key: str  # sample key in the shard; a decimal string (FastComposer ids must int() parse)
    caption: str
    caption_raw: str
    width: int
    height: int
    segments: list[Segment]
    phrases: list[Phrase]
    scores: MatchScores
    provenance: Provenance
    split: str
    models: dict[str, str]
    unmatched_phrases: list[int] = field(default_factory=list)  # indices into phrases
    unmatched_person_segments: list[int] = field(default_factory=list)  # segment ids
    caption_flags: list[str] = field(default_factory=list)  # e.g. "empty", "degenerate"
    face_checks: FaceChecks | None = None  # None: not checked (a 1.0 record, or the face stage did not run)
    identity_faces: list[ImageFace] | None = None  # schema 1.2 (datagen.record.identity_faces); None: not looked for
    identity_checks: IdentityChecks | None = None  # set where a run's identity index was joined (export --identities)
    schema_version: str = SCHEMA_VERSION
    # Top-level fields that stages outside the contract add (Step.record_fields); kept as read
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {
            "schema_version": self.schema_version,
            "key": self.key,
            "caption": self.caption,
            "caption_raw": self.caption_raw,
            "width": self.width,
            "height": self.height,
            "segments": [s.to_dict() for s in self.segments],
            "phrases": [asdict(p) for p in self.phrases],
            "scores": asdict(self.scores),
            "unmatched_phrases": list(self.unmatched_phrases),
            "unmatched_person_segments": list(self.unmatched_person_segments),
            "caption_flags": list(self.caption_flags),
            "provenance": self.provenance.to_dict(),
            "split": self.split,
            "models": dict(self.models),
        }
        if self.schema_version != "1.0":  # a 1.0 record reads back as it was written
            d["face_checks"] = asdict(self.face_checks) if self.face_checks is not None else None
        if self.schema_version not in OLDER_VERSIONS:
            d["identity_faces"] = [asdict(f) for f in self.identity_faces] if self.identity_faces is not None else None
        if self.identity_checks is not None:  # absent from the tar's record (written before the index)
            d["identity_checks"] = asdict(self.identity_checks)
        clash = sorted(set(self.extra) & CONTRACT_FIELDS)
        if clash:
            raise RecordError(clash[0], "is a field of the record contract; a stage cannot add it", self.key)
        d.update(self.extra)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        key = d.get("key") if isinstance(d, dict) else None
        if not isinstance(d, dict):
            raise RecordError("<root>", f"must be a JSON object, got {type(d).__name__}")
        required = (
            "key", "caption", "caption_raw", "width", "height", "segments", "phrases", "scores",
            "provenance", "split", "models",
        )
        for name in required:
            if name not in d:
                raise RecordError(name, "is missing", key)
        try:
            segments = [Segment.from_dict(s) for s in d["segments"]]
        except (TypeError, AttributeError) as e:
            raise RecordError("segments", f"has a malformed item: {e}", key) from e
        try:
            phrases = [Phrase(**p) for p in d["phrases"]]
        except TypeError as e:
            raise RecordError("phrases", f"has a malformed item: {e}", key) from e
        try:
            scores = MatchScores(**d["scores"])
        except TypeError as e:
            raise RecordError("scores", f"is malformed: {e}", key) from e
        try:
            provenance = Provenance(**d["provenance"])
        except TypeError as e:
            raise RecordError("provenance", f"is malformed: {e}", key) from e
        try:
            face_checks = FaceChecks.from_dict(d["face_checks"]) if d.get("face_checks") is not None else None
        except (TypeError, AttributeError) as e:
            raise RecordError("face_checks", f"is malformed: {e}", key) from e
        try:
            faces = [ImageFace.from_dict(f) for f in d["identity_faces"]] if d.get("identity_faces") is not None else None
        except (TypeError, AttributeError) as e:
            raise RecordError("identity_faces", f"is malformed: {e}", key) from e
        try:
            checks = IdentityChecks.from_dict(d["identity_checks"]) if d.get("identity_checks") is not None else None
        except (TypeError, AttributeError) as e:
            raise RecordError("identity_checks", f"is malformed: {e}", key) from e
        rec = cls(
            key=d["key"], caption=d["caption"], caption_raw=d["caption_raw"], width=d["width"],
            height=d["height"], segments=segments, phrases=phrases, scores=scores,
            provenance=provenance, split=d["split"], models=d["models"],
            unmatched_phrases=d.get("unmatched_phrases", []),
            unmatched_person_segments=d.get("unmatched_person_segments", []),
            caption_flags=d.get("caption_flags", []),
            face_checks=face_checks, identity_faces=faces, identity_checks=checks,
            schema_version=d.get("schema_version", SCHEMA_VERSION),
            extra={k: v for k, v in d.items() if k not in CONTRACT_FIELDS},
        )
        rec.validate()
        return rec

    @classmethod
    def from_json(cls, text: str | bytes) -> Record:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError("<root>", f"is not valid JSON: {e}") from e
        return cls.from_dict(d)

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> Record:
        """Check every invariant a consumer relies on; raise :class:`RecordError` naming the field."""
        k = self.key if isinstance(self.key, str) else None

        def fail(path: str, problem: str) -> None:
            raise RecordError(path, problem, k)

        self._check_fields(fail)
        seen_ids = self._check_segments(fail)
        self._check_phrases(fail, seen_ids)
        matched_by_seg = {s.id: s for s in self.segments if s.matched}
        self._check_matches(fail, seen_ids, matched_by_seg)
        self._check_faces(fail, matched_by_seg)
        persons = {s.id for s in self.segments if s.coco_label == PERSON_LABEL}
        check_identity_faces(self.identity_faces, self.schema_version, persons, fail)
        check_identity_checks(self.identity_checks, self.schema_version, persons, fail)
        self._check_scores(fail, seen_ids)
        self._check_provenance(fail)
        return self

    def _check_fields(self, fail) -> None:
        """The record's own fields: schema version, key, captions, size, split, models."""
        if self.schema_version not in READABLE_VERSIONS:
            fail("schema_version", f"is {self.schema_version!r}, this code reads {', '.join(map(repr, READABLE_VERSIONS))}")
        if not isinstance(self.key, str) or not self.key.isdigit():
            fail("key", f"must be a string of decimal digits (FastComposer ids int()-parse), got {self.key!r}")
        if not isinstance(self.caption, str):
            fail("caption", f"must be a string, got {type(self.caption).__name__}")
        if not isinstance(self.caption_raw, str):
            fail("caption_raw", f"must be a string, got {type(self.caption_raw).__name__}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                fail(name, f"must be a positive integer, got {v!r}")
        if self.split not in SPLITS:
            fail("split", f"must be one of {SPLITS}, got {self.split!r}")
        if not isinstance(self.models, dict) or not all(
            isinstance(a, str) and isinstance(b, str) for a, b in self.models.items()
        ):
            fail("models", "must map stage names to model ids (strings)")

    def _check_segments(self, fail) -> set[int]:
        """Each segment in turn; returns the segment ids (each one once)."""
        seen_ids: set[int] = set()
        for i, s in enumerate(self.segments):
            p = f"segments[{i}]"
            if not _is_int(s.id) or not (1 <= s.id <= 65535):
                fail(f"{p}.id", f"must be an integer in 1..65535 (0 means no segment), got {s.id!r}")
            if s.id in seen_ids:
                fail(f"{p}.id", f"duplicates segment id {s.id}")
            seen_ids.add(s.id)
            self._check_segment(fail, p, s)
        return seen_ids

    def _check_segment(self, fail, p: str, s: Segment) -> None:
        """One segment's label, class, box, area and score, and its phrase when it is matched."""
        if not isinstance(s.coco_label, str) or not s.coco_label:
            fail(f"{p}.coco_label", f"must be a non-empty string, got {s.coco_label!r}")
        if s.label_vocab not in (None, "coco", "open"):
            fail(f"{p}.label_vocab", f"must be 'coco' or 'open' when given, got {s.label_vocab!r}")
        if (not _is_int(s.category_id) or s.category_id < 0) and not (s.category_id is None and s.label_vocab == "open"):
            fail(f"{p}.category_id", f"must be a non-negative integer (null only for an open label), got {s.category_id!r}")
        if not isinstance(s.is_thing, bool):
            fail(f"{p}.is_thing", f"must be a boolean, got {s.is_thing!r}")
        if (
            not isinstance(s.bbox, list | tuple)
            or len(s.bbox) != 4
            or not all(_is_int(v) for v in s.bbox)
        ):
            fail(f"{p}.bbox", f"must be four integers [x0, y0, x1, y1], got {s.bbox!r}")
        x0, y0, x1, y1 = s.bbox
        if not (0 <= x0 < x1 <= self.width and 0 <= y0 < y1 <= self.height):
            fail(
                f"{p}.bbox",
                f"{list(s.bbox)} is not a non-empty box inside the {self.width}x{self.height} image",
            )
        if not _is_int(s.area) or not (0 < s.area <= (x1 - x0) * (y1 - y0)):
            fail(f"{p}.area", f"must be a positive integer no larger than its bbox, got {s.area!r}")
        if not _is_number(s.score):
            fail(f"{p}.score", f"must be a finite number, got {s.score!r}")
        span = (s.word, s.start, s.end)
        if any(v is not None for v in span):
            if not isinstance(s.word, str) or not s.word:
                fail(f"{p}.word", f"must be a non-empty string when matched, got {s.word!r}")
            self._check_span(fail, p, s.start, s.end, s.word)
            if not _is_number(s.match_score):
                fail(f"{p}.match_score", f"must be a finite number when matched, got {s.match_score!r}")

    def _check_phrases(self, fail, seen_ids: set[int]) -> None:
        """Each phrase: its text, its span in the caption, the segment it names."""
        for i, ph in enumerate(self.phrases):
            p = f"phrases[{i}]"
            if not isinstance(ph.text, str) or not ph.text:
                fail(f"{p}.text", f"must be a non-empty string, got {ph.text!r}")
            self._check_span(fail, p, ph.start, ph.end, ph.text)
            if ph.segment_id is not None and ph.segment_id not in seen_ids:
                fail(f"{p}.segment_id", f"names segment {ph.segment_id}, which is not in segments")

    def _check_matches(self, fail, seen_ids: set[int], matched_by_seg: dict[int, Segment]) -> None:
        """Phrases and segments agree on each match; the unmatched lists hold only what is unmatched."""
        for i, ph in enumerate(self.phrases):
            if ph.segment_id is None:
                continue
            s = matched_by_seg.get(ph.segment_id)
            if s is None or (s.start, s.end) != (ph.start, ph.end):
                fail(f"phrases[{i}].segment_id", f"says segment {ph.segment_id}, but that segment does not carry this phrase's span")
        for i in self.unmatched_phrases:
            if not _is_int(i) or not (0 <= i < len(self.phrases)):
                fail("unmatched_phrases", f"holds {i!r}, not an index into phrases")
            if self.phrases[i].segment_id is not None:
                fail("unmatched_phrases", f"lists phrase {i}, which is matched")
        for sid in self.unmatched_person_segments:
            if sid not in seen_ids:
                fail("unmatched_person_segments", f"holds {sid!r}, not a segment id")
            if sid in matched_by_seg:
                fail("unmatched_person_segments", f"lists segment {sid}, which is matched")

    def _check_scores(self, fail, seen_ids: set[int]) -> None:
        """The score matrices: phrases x segments, finite numbers, over the record's segment ids."""
        sc = self.scores
        if sc.segment_ids and sorted(sc.segment_ids) != sorted(seen_ids):
            fail("scores.segment_ids", f"{sc.segment_ids} do not match the segment ids {sorted(seen_ids)}")
        for name in ("clip", "sbert", "product"):
            m = getattr(sc, name)
            if not m:
                continue
            if len(m) != len(self.phrases) or any(len(row) != len(sc.segment_ids) for row in m):
                fail(f"scores.{name}", f"must be a {len(self.phrases)}x{len(sc.segment_ids)} matrix (phrases x segments)")
            if not all(_is_number(v) for row in m for v in row):
                fail(f"scores.{name}", "holds a value that is not a finite number")

    def _check_provenance(self, fail) -> None:
        pv = self.provenance
        if pv.source not in SOURCES:
            fail("provenance.source", f"must be one of {SOURCES}, got {pv.source!r}")
        if not isinstance(pv.pixel_md5, str) or len(pv.pixel_md5) != 32:
            fail("provenance.pixel_md5", f"must be a 32-character hex md5, got {pv.pixel_md5!r}")
        if not isinstance(pv.original_size, list | tuple) or len(pv.original_size) != 2:
            fail("provenance.original_size", f"must be [w, h], got {pv.original_size!r}")

    def _check_faces(self, fail, matched_by_seg: dict[int, Segment]) -> None:
        """The face fields: present only from 1.1 on, on person segments only, well formed."""
        old = self.schema_version == "1.0"
        if old and self.face_checks is not None:
            fail("face_checks", "is a schema 1.1 field; a 1.0 record has none")
        for i, s in enumerate(self.segments):
            p = f"segments[{i}].faces"
            if s.faces is None:
                continue
            if old:
                fail(p, "is a schema 1.1 field; a 1.0 record has none")
            if s.coco_label != PERSON_LABEL:
                fail(p, f"is only for person segments, this one is {s.coco_label!r}")
            if not isinstance(s.faces, list):
                fail(p, f"must be a list of faces, got {s.faces!r}")
            for j, f in enumerate(s.faces):
                if not isinstance(f.box, list | tuple) or len(f.box) != 4 or not all(_is_number(v) for v in f.box) \
                        or not (f.box[0] < f.box[2] and f.box[1] < f.box[3]):
                    fail(f"{p}[{j}].box", f"must be four numbers [x0, y0, x1, y1] with x0 < x1, y0 < y1, got {f.box!r}")
                if not _is_number(f.score) or not 0 <= f.score <= 1:
                    fail(f"{p}[{j}].score", f"must be a probability in 0..1, got {f.score!r}")
                if not _is_int(f.size) or f.size < 0:
                    fail(f"{p}[{j}].size", f"must be a non-negative integer (px), got {f.size!r}")
                if not _is_number(f.inside) or not 0 <= f.inside <= 1:
                    fail(f"{p}[{j}].inside", f"must be a share in 0..1, got {f.inside!r}")
        fc = self.face_checks
        if fc is None:
            return
        if not _is_int(fc.small_face_px) or fc.small_face_px < 0:
            fail("face_checks.small_face_px", f"must be a non-negative integer, got {fc.small_face_px!r}")
        if not _is_number(fc.primary_min_overlap) or not 0 <= fc.primary_min_overlap <= 1:
            fail("face_checks.primary_min_overlap", f"must be a share in 0..1, got {fc.primary_min_overlap!r}")
        if not isinstance(fc.flags, list) or any(f not in FACE_FLAG_NAMES for f in fc.flags) \
                or list(fc.flags) != [f for f in FACE_FLAG_NAMES if f in fc.flags]:
            fail("face_checks.flags", f"must list names of {FACE_FLAG_NAMES}, once each, in that order; got {fc.flags!r}")
        missing = [s.id for s in self.segments if s.coco_label == PERSON_LABEL and s.faces is None]
        if missing:
            fail("face_checks", f"says faces were checked, but person segment(s) {missing} carry no 'faces'")
        pf = fc.primary_face
        if pf is None:
            return
        if not isinstance(pf.rect, list | tuple) or len(pf.rect) != 4 or not all(_is_int(v) for v in pf.rect):
            fail("face_checks.primary_face.rect", f"must be four integers [x0, y0, x1, y1], got {pf.rect!r}")
        seg = next((s for s in self.segments if s.id == pf.segment_id), None)
        if pf.segment_id is not None and seg is None:
            fail("face_checks.primary_face.segment_id", f"names segment {pf.segment_id!r}, which is not in segments")
        if not _is_number(pf.overlap) or not 0 <= pf.overlap <= 1:
            fail("face_checks.primary_face.overlap", f"must be a share in 0..1, got {pf.overlap!r}")
        is_matched_person = seg is not None and seg.coco_label == PERSON_LABEL and seg.id in matched_by_seg
        if pf.matched_person is not is_matched_person:
            fail("face_checks.primary_face.matched_person",
                 f"is {pf.matched_person!r}, but segment {pf.segment_id} is{'' if is_matched_person else ' not'} a matched person")

    def _check_span(self, fail, p: str, start, end, text: str) -> None:
        if not _is_int(start) or not _is_int(end) or not (0 <= start < end <= len(self.caption)):
            fail(f"{p}.start", f"span [{start!r}, {end!r}) is not inside the caption (length {len(self.caption)})")
        if self.caption[start:end] != text:
            fail(f"{p}.end", f"span [{start}, {end}) reads {self.caption[start:end]!r} in the caption, not {text!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)
