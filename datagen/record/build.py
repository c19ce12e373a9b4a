"""Turn the stages' outputs into validated records: the one path the Ray job and tests share.

``build_record`` is pure bookkeeping (no model): it joins one image's caption flags, panoptic
result, chunked caption, match and face checks into a :class:`~datagen.record.schema.Record` and
validates it. The Ray job's encode task calls :func:`record_from_outputs` on what the stage actors
returned, which adds the fields of stages outside the contract. The face flags
(:data:`~datagen.record.schema.FACE_FLAG_NAMES`, defined in :mod:`datagen.record.schema`) are decided
here, by :func:`face_flags`, because they need the matches as well as the faces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from datagen.record.face_fields import FaceChecks, PrimaryFace, SegmentFace
from datagen.record.schema import (
    FACE_FLAG_NAMES,
    OPTIONAL_PROVENANCE,
    PERSON_LABEL,
    ImageFace,
    MatchScores,
    Phrase,
    Provenance,
    Record,
    Segment,
)

if TYPE_CHECKING:
    from datagen.sources.images import LoadedImage
    from datagen.stage_table import Stage
    from datagen.stages.face_checker import FaceCheck
    from datagen.stages.identity import IdentityFace
    from datagen.stages.matcher import MatchResult
    from datagen.stages.phrases import ChunkedCaption
    from datagen.stages.segmenter import PanopticResult



def build_record(
    loaded: LoadedImage,
    caption_flags: list[str],
    panoptic: PanopticResult,
    chunked: ChunkedCaption,
    match: MatchResult,
    models: dict[str, str],
    faces: FaceCheck | None = None,
) -> Record:
    """``faces``: the face stage's findings for the image; ``None`` leaves the record unchecked
    (``face_checks`` null, no ``faces`` on its segments)."""
    item = loaded.item
    width, height = loaded.image.size
    if panoptic.segment_map.shape != (height, width):
        raise ValueError(
            f"{item.rel_path}: segment map is {panoptic.segment_map.shape[1]}x{panoptic.segment_map.shape[0]}, "
            f"image is {width}x{height}"
        )
    segments = [
        Segment(
            id=int(s.id), coco_label=s.coco_label, is_thing=bool(s.is_thing),
            category_id=int(s.category_id) if s.category_id is not None else None,  # None: an open label
            bbox=[int(v) for v in s.bbox], area=int(s.area), score=float(s.score),
            label_vocab=getattr(s, "label_vocab", None),  # phrase-grounded segments say which vocabulary
        )
        for s in panoptic.segments
    ]
    phrases = matched_phrases(segments, chunked, match)
    record = Record(
        key=item.key,
        caption=chunked.caption,
        caption_raw=chunked.caption_raw,
        width=width,
        height=height,
        segments=segments,
        phrases=phrases,
        scores=MatchScores(
            segment_ids=[int(s) for s in match.segment_ids],
            clip=_rows(match.clip),
            sbert=_rows(match.sbert),
            product=_rows(match.product),
            min_score=float(match.min_score),
        ),
        provenance=provenance_of(loaded),
        split=item.split,
        models=dict(models),
        unmatched_phrases=[i for i, p in enumerate(phrases) if p.segment_id is None],
        unmatched_person_segments=[s.id for s in segments if s.coco_label == PERSON_LABEL and not s.matched],
        caption_flags=list(caption_flags),
        face_checks=face_checks_of(segments, faces) if faces is not None else None,
    )
    return record.validate()


def record_from_outputs(loaded: LoadedImage, outputs: Mapping[str, Any], models: dict[str, str],
                        stages: Sequence[Stage] = ()) -> Record:
    """The record of one image from every stage's output for it (``outputs``: stage name -> output):
    the contract stages' through :func:`build_record`, then each other stage's
    :meth:`~datagen.stages.step.Step.record_fields` (``stages``: the build's stage table rows)."""
    (_, flags), (chunked, match) = outputs["captioner"], outputs["matcher"]
    record = build_record(loaded, flags, outputs["segmenter"], chunked, match, models, outputs.get("faces"))
    if outputs.get("identity") is not None:
        record.identity_faces = identity_faces_of(outputs["identity"])
    for stage in stages:
        record.extra.update(stage.step_class().record_fields(outputs[stage.name]))
    return record.validate() if record.extra or record.identity_faces is not None else record


def identity_faces_of(faces: Sequence[IdentityFace]) -> list[ImageFace]:
    """The identity stage's faces of one image as the record keeps them (the embeddings go to the face table)."""
    return [ImageFace(box=[float(v) for v in f.box], score=float(f.score), size=int(f.size), segment_id=f.segment_id,
                      embedded=f.embedding is not None, reason=f.reason) for f in faces]


def matched_phrases(segments: list[Segment], chunked: ChunkedCaption, match: MatchResult) -> list[Phrase]:
    """The caption's phrases, each with its matched segment; the matched segments get the phrase's
    word, span and scores."""
    col_of = {sid: j for j, sid in enumerate(match.segment_ids)}
    seg_of_phrase = {p: sid for p, sid in match.pairs}
    seg_by_id = {s.id: s for s in segments}
    phrases = []
    for i, ph in enumerate(chunked.phrases):
        sid = seg_of_phrase.get(i)
        phrases.append(Phrase(text=ph.text, start=int(ph.start), end=int(ph.end), segment_id=sid))
        if sid is not None:
            seg, j = seg_by_id[sid], col_of[sid]
            seg.word, seg.start, seg.end = ph.text, int(ph.start), int(ph.end)
            for name, value in match.segment_scores(i, j).items():  # the grounding's own scores
                setattr(seg, name, _round(value))
    return phrases


def provenance_of(loaded: LoadedImage) -> Provenance:
    item = loaded.item
    meta: dict[str, Any] = item.meta or {}
    return Provenance(
        source=meta["source"],
        source_id=item.source_id,
        path=item.rel_path,
        pixel_md5=loaded.pixel_md5,
        original_size=[int(v) for v in loaded.original_size],
        license=meta.get("license"),
        license_url=meta.get("license_url"),
        author=meta.get("author"),
        photo_url=meta.get("photo_url"),
        photo_title=meta.get("photo_title"),
        face_rect=meta.get("face_rect"),
        duplicate_of=item.duplicate_of,
        **{name: meta.get(name) for name in OPTIONAL_PROVENANCE},
    )


def face_checks_of(segments: list[Segment], faces: FaceCheck) -> FaceChecks:
    """Put the face stage's faces on the person segments; the record's face checks with their flags."""
    seg_by_id = {s.id: s for s in segments}
    for seg in segments:
        if seg.coco_label == PERSON_LABEL:
            seg.faces = [SegmentFace(box=[float(v) for v in f.box], score=float(f.score), size=int(f.size),
                                     inside=float(f.inside)) for f in faces.faces.get(seg.id, [])]
    primary = None
    if faces.primary is not None:
        cover = seg_by_id.get(faces.primary.segment_id)
        primary = PrimaryFace(
            rect=[int(v) for v in faces.primary.rect], segment_id=faces.primary.segment_id,
            overlap=float(faces.primary.overlap),
            matched_person=cover is not None and cover.coco_label == PERSON_LABEL and cover.matched,
        )
    checks = FaceChecks(small_face_px=int(faces.small_face_px),
                        primary_min_overlap=float(faces.primary_min_overlap), primary_face=primary)
    checks.flags = face_flags(segments, checks)
    return checks


def face_flags(segments: list[Segment], checks: FaceChecks) -> list[str]:
    """The face flags of a record's segments (definitions: :mod:`datagen.record.schema`)."""
    persons = [s for s in segments if s.coco_label == PERSON_LABEL]
    matched = [s for s in persons if s.matched]
    seg_by_id = {s.id: s for s in segments}
    pf = checks.primary_face
    cover = seg_by_id.get(pf.segment_id) if pf is not None else None
    unsegmented = pf is not None and (
        cover is None or cover.coco_label != PERSON_LABEL or pf.overlap < checks.primary_min_overlap
    )
    found = {
        "merged_persons": any(len(s.faces or []) >= 2 for s in persons),
        "faceless_person": any(not s.faces for s in matched),
        "small_face": any(s.faces and max(f.size for f in s.faces) < checks.small_face_px for s in matched),
        "primary_face_unsegmented": unsegmented,
        "primary_face_unmatched": pf is not None and not unsegmented and not cover.matched,
    }
    return [name for name in FACE_FLAG_NAMES if found[name]]


SCORE_DIGITS = 6  # scores are float32 products; 6 decimals keep them exact enough and records short


def _round(v) -> float:
    return round(float(v), SCORE_DIGITS)


def _rows(m) -> list[list[float]]:
    return [[_round(v) for v in row] for row in m.tolist()] if getattr(m, "size", 0) else []
