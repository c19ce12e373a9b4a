"""The report's gallery: which samples it shows, and each one's card (thumbnail, caption, legend).

:func:`select_gallery` picks from ``samples.parquet``'s rows; :func:`draw_cards` reads only the
picked samples from their shards (by member name), draws each with
:func:`datagen.report.record_figure.overlay` as a base64 JPEG and stops at the byte budget. Cards
are plain data; the template (macro ``card``) writes them out.
"""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field

from datagen import storage
from datagen.manifests.run_manifest import RunFolderError
from datagen.record.quality import FLAG_NAMES
from datagen.record.schema import FACE_FLAG_NAMES
from datagen.report.record_figure import caption_runs, hex_colour, overlay, segment_styles
from datagen.report.values import as_number, fixed, show
from datagen.shards.reader import iter_samples

GALLERY_MAX = 240
THUMB_SIDE = 256
THUMB_QUALITY = 70
GALLERY_BUDGET = 8 << 20

FLAG_TITLES = {
    "unmatched_person_segment": "unmatched person segment",
    "unmatched_subject_phrase": "unmatched subject phrase",
    "ambiguous_match": "ambiguous match",
    "no_person": "no person",
    "no_match": "no match",
    "merged_persons": "merged persons (a person segment with 2+ faces)",
    "faceless_person": "faceless person (a matched person without a face)",
    "small_face": "small face",
    "primary_face_unsegmented": "primary face not in a person segment",
    "primary_face_unmatched": "primary face in an unmatched person",
}
FACE_SECTION_SHARE = 15  # each face flag gets up to gallery_max // 15 places (16 of 240)


@dataclass
class GalleryPick:
    row: dict
    section: str
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CaptionRun:
    text: str
    kind: str | None  # None (plain), "matched" or "unmatched"
    badge: str | None
    colour: str | None  # "#rrggbb" of a matched run


@dataclass(frozen=True)
class LegendItem:
    badge: str
    colour: str
    label: str
    margin: str | None


@dataclass(frozen=True)
class Card:
    key: str
    source_id: str
    file: str  # the source image's path under its source
    credit: str  # the photo's author and licence, when its record names them
    split: str
    shard_name: str
    weakest: str
    n_matched: str
    n_phrases: str
    n_person_segments: str
    faces: str  # what the face checks found ("" when not checked)
    caption: list[CaptionRun]
    legend: list[LegendItem]
    tags: list[str]
    jpeg_base64: str
    width: int
    height: int
    section: str
    command: str  # the ``inspect`` command that draws the sample in full


def select_gallery(rows: list[dict], gallery_max: int = GALLERY_MAX) -> list[GalleryPick]:
    """Which written samples the gallery shows, in sections, each sample once.

    First each face flag (:data:`~datagen.record.schema.FACE_FLAG_NAMES`) gets a row of its own, up
    to ``gallery_max // FACE_SECTION_SHARE`` samples with that flag (weakest first; a sample with two
    face flags is in both rows). Then, each sample at most once more: half the places go to the
    lowest weakest-match scores, then a fifth to the smallest margins (near ties), the rest
    round-robin over the match flags (images with no match at all, unmatched person segment,
    unmatched subject phrase, no person), each flag's samples weakest first. The picks come back in
    page order: weakest, near ties, match flags, face flags; at most ``gallery_max`` in all.
    """
    written = [r for r in rows if r["status"] == "written"]
    for r in written:
        r["no_match"] = not as_number(r["n_matched"])

    def weakest_first(r):
        score = as_number(r["min_match_score"])
        return (-math.inf if score is None else score, str(r["source_id"]))

    face_picks: list[GalleryPick] = []
    for f in FACE_FLAG_NAMES:
        flagged = sorted((r for r in written if r.get(f) is True), key=weakest_first)  # null: not checked
        room = min(max(1, gallery_max // FACE_SECTION_SHARE), gallery_max - len(face_picks))
        face_picks += [GalleryPick(r, f"Face check: {FLAG_TITLES[f]}") for r in flagged[:room]]
    picked: dict[str, GalleryPick] = {}
    room = gallery_max - len(face_picks)

    def take(candidates, section, limit):
        n = 0
        for r in candidates:
            if n >= limit or len(picked) >= room:
                break
            if r["key"] not in picked:
                picked[r["key"]] = GalleryPick(r, section)
                n += 1

    matched = sorted((r for r in written if not r["no_match"]), key=weakest_first)
    take(matched, "Weakest matches", gallery_max // 2)
    near_ties = sorted((r for r in written if as_number(r["min_margin"]) is not None and r["ambiguous_match"]),
                       key=lambda r: (r["min_margin"], str(r["source_id"])))
    take(near_ties, "Near ties (ambiguous matches)", gallery_max // 5)
    queues = {f: sorted((r for r in written if r[f]), key=weakest_first)
              for f in ("no_match", "unmatched_person_segment", "unmatched_subject_phrase", "no_person")}
    positions = dict.fromkeys(queues, 0)
    while len(picked) < room and any(positions[f] < len(q) for f, q in queues.items()):
        for f, q in queues.items():
            while positions[f] < len(q) and q[positions[f]]["key"] in picked:
                positions[f] += 1
            if positions[f] < len(q) and len(picked) < room:
                r = q[positions[f]]
                picked[r["key"]] = GalleryPick(r, f"Flagged: {FLAG_TITLES[f]}")
                positions[f] += 1
    picks = [*picked.values(), *face_picks]
    for p in picks:
        p.tags = [FLAG_TITLES[f] for f in ("no_match", *FLAG_NAMES, *FACE_FLAG_NAMES) if p.row.get(f)]
    return picks


def draw_cards(
    picks: list[GalleryPick], shards: list[dict], thumb_side: int, budget: int, run_name: str
) -> tuple[list[Card], int]:
    """The picks' cards in gallery order, and how many were left out because the budget was spent."""
    tar_of = {s["shard"]: storage.path(s["tar"]) for s in shards if isinstance(s["tar"], str) and s["tar"]}
    by_shard: dict[object, list[str]] = defaultdict(list)
    for p in picks:
        shard = p.row["shard"]
        if shard not in tar_of:
            raise RunFolderError(
                f"samples.parquet puts sample {p.row['key']!r} in shard {shard!r}, for which shards.parquet "
                "names no tar; rebuild the tables with --rebuild-tables"
            )
        by_shard[shard].append(p.row["key"])
    rendered: dict[str, tuple] = {}  # key -> (record, base64 JPEG, size): a sample in two rows is drawn once
    for shard, keys in by_shard.items():  # one shard at a time: only its few samples are decoded
        for key, sample in iter_samples(tar_of[shard], list(dict.fromkeys(keys))):
            img = overlay(sample.image, sample.segment_map, sample.record, max_side=thumb_side)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
            rendered[key] = (sample.record, base64.b64encode(buf.getvalue()).decode("ascii"), img.size)
    cards, spent, dropped = [], 0, 0
    for p in picks:  # the budget is spent in gallery order: the weakest samples come first
        record, b64, size = rendered[p.row["key"]]
        if spent + len(b64) > budget:
            dropped += 1
            continue
        spent += len(b64)
        cards.append(_card(p, record, b64, size, run_name))
    return cards, dropped


def sections(cards: list[Card]) -> dict[str, list[Card]]:
    """The cards grouped by section, sections in order of first appearance."""
    out: dict[str, list[Card]] = {}
    for c in cards:
        out.setdefault(c.section, []).append(c)
    return out


def _card(pick: GalleryPick, record, b64: str, size: tuple[int, int], run_name: str) -> Card:
    r = pick.row
    styles = segment_styles(record)
    colour_of_badge = {st.badge: hex_colour(st.colour) for st in styles.values() if st.badge}
    caption = [CaptionRun(text, kind, badge, colour_of_badge.get(badge) if kind == "matched" else None)
               for text, kind, badge in caption_runs(record)]
    ids, margins = r["matched_segment_ids"], r["match_margins"]
    margin_of = dict(zip(ids, margins, strict=False)) if isinstance(ids, list) and isinstance(margins, list) else {}
    legend = [
        LegendItem(st.badge, hex_colour(st.colour), st.label,
                   None if margin_of.get(sid) is None else fixed(margin_of[sid]))
        for sid, st in styles.items() if st.badge
    ]
    pv = record.provenance
    return Card(
        key=show(r["key"]), source_id=show(r["source_id"]), file=show(r.get("rel_path") or pv.path),
        credit=" · ".join(v for v in (pv.author, pv.license) if v),
        split=show(r["split"]), shard_name=show(r["shard_name"]), weakest=fixed(r["min_match_score"]),
        n_matched=show(r["n_matched"]), n_phrases=show(r["n_phrases"]), n_person_segments=show(r["n_person_segments"]),
        faces=_faces_line(record), caption=caption, legend=legend, tags=list(pick.tags), jpeg_base64=b64, width=size[0], height=size[1],
        section=pick.section, command=f"subject-ffhq inspect {run_name} {r['source_id']}",
    )


def _faces_line(record) -> str:
    """The face checks of a card in words: faces per person segment and what covers the face rect."""
    fc = record.face_checks
    if fc is None:
        return ""
    per = [f"{s.id}: {len(s.faces or [])}" for s in record.segments if s.faces is not None]
    parts = ["faces per person segment " + (", ".join(per) if per else "(no person segment)")]
    pf = fc.primary_face
    if pf is not None:
        if pf.segment_id is None:
            parts.append("face rect: no segment")
        else:
            label = next(s.coco_label for s in record.segments if s.id == pf.segment_id)
            matched = "matched" if pf.matched_person else "unmatched"
            parts.append(f"face rect: segment {pf.segment_id} ({label}, {matched}), {pf.overlap:.0%} of it")
    return " · ".join(parts)
