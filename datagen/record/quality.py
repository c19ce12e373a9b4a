"""How good one record's phrase↔segment matching is: the numbers and flags people audit and filter on.

Pure bookkeeping over a :class:`~datagen.record.schema.Record` (no model, no I/O). Shared by the run's
manifest tables, the report, ``inspect`` and the export filters, so every tool means the same thing.

Definitions (a "match" is a phrase with a ``segment_id``; its score is the segment's ``match_score``,
the CLIP × SBERT product the greedy matcher picked):

* **weakest match score** (``min_match_score``): the lowest score over the record's matches.
* **margin** of a match (phrase *p*, segment *s*): how close the greedy matcher's decision was.
  Greedy picks matches in descending score order; when it picked (*p*, *s*), the alternatives were
  *p* with another segment still free, and *s* with another phrase still free. The margin is
  ``product[p, s]`` minus the best of those alternatives' scores (so it is never negative). A small
  margin means a different assignment scored almost as well: a near tie. ``min_margin`` is the
  smallest margin over the record's matches; it is ``None`` when no match had an alternative
  (a 1 × 1 matrix, or no match).
* **ambiguous match**: ``min_margin < ambiguous_margin`` (default :data:`AMBIGUOUS_MARGIN`).
* **unmatched person segment**: a ``person`` segment no phrase was matched to.
* **unmatched subject phrase**: an unmatched phrase that names a person, i.e. one of its words is in
  :data:`PERSON_WORDS` ("a young man", "the bride", "two children" …). Unmatched background
  phrases ("a beach") are counted (``n_unmatched_phrases``) but not flagged.
* **no person**: the image has no ``person`` segment at all.

The person numbers above are FastComposer's default subjects. For any list of object types (the
profile's ``subjects.object_types``), :func:`subject_segments` splits a record's segments of those
COCO labels into matched (the subjects) and unmatched ones: the export filters use it, and the
report counts per type from the same two facts (a segment's label, whether it is matched).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from datagen.record.schema import PERSON_LABEL, Record, Segment

AMBIGUOUS_MARGIN = 0.01

PERSON_WORDS = frozenset(
    """
    person people persons man men woman women boy boys girl girls child children kid kids baby babies
    toddler toddlers infant infants lady ladies guy guys gentleman gentlemen teenager teenagers teen teens
    adult adults bride groom couple family friends friend player players athlete athletes student students
    mother father mom dad parent parents daughter son sister brother grandmother grandfather wife husband
    individual individuals crowd
    """.split()
)

_WORD = re.compile(r"[a-z]+")


def names_a_person(phrase: str) -> bool:
    """True when one of the phrase's words is a person noun (see :data:`PERSON_WORDS`)."""
    return any(w in PERSON_WORDS for w in _WORD.findall(phrase.lower()))


@dataclass
class MatchQuality:
    n_phrases: int
    n_segments: int
    n_person_segments: int
    n_matched: int
    n_matched_person: int
    n_unmatched_phrases: int
    n_unmatched_person_segments: int
    match_scores: list[float]  # one per match, in phrase order
    match_margins: list[float | None]  # one per match, in phrase order
    matched_words: list[str]
    matched_labels: list[str]  # coco label of each match's segment
    matched_segment_ids: list[int]
    min_match_score: float | None
    mean_match_score: float | None
    min_margin: float | None
    unmatched_person_segment: bool
    unmatched_subject_phrase: bool
    ambiguous_match: bool
    no_person: bool
    flags: list[str] = field(default_factory=list)  # names of the flags that are set


FLAG_NAMES = ("unmatched_person_segment", "unmatched_subject_phrase", "ambiguous_match", "no_person")


def subject_segments(record: Record, object_types: Iterable[str]) -> tuple[list[Segment], list[Segment]]:
    """The record's segments whose COCO label is one of ``object_types``: (matched, unmatched)."""
    wanted = set(object_types)
    chosen = [s for s in record.segments if s.coco_label in wanted]
    return [s for s in chosen if s.matched], [s for s in chosen if not s.matched]


def match_margins(record: Record) -> dict[int, float | None]:
    """Margin of each matched phrase (phrase index -> margin), as defined in the module docstring."""
    product = record.scores.product
    col_of = {sid: j for j, sid in enumerate(record.scores.segment_ids)}
    pairs = [(i, col_of.get(ph.segment_id)) for i, ph in enumerate(record.phrases) if ph.segment_id is not None]
    out: dict[int, float | None] = {i: None for i, j in pairs if j is None or not product}
    pairs = [(i, j) for i, j in pairs if i not in out]
    pairs.sort(key=lambda ij: -product[ij[0]][ij[1]])  # the greedy pick order
    used_rows: set[int] = set()
    used_cols: set[int] = set()
    for i, j in pairs:
        others = [v for jj, v in enumerate(product[i]) if jj != j and jj not in used_cols]
        others += [product[ii][j] for ii in range(len(product)) if ii != i and ii not in used_rows]
        out[i] = float(product[i][j] - max(others)) if others else None
        used_rows.add(i)
        used_cols.add(j)
    return out


def match_quality(record: Record, ambiguous_margin: float = AMBIGUOUS_MARGIN) -> MatchQuality:
    seg_by_id = {s.id: s for s in record.segments}
    margins = match_margins(record)
    scores, words, labels, seg_ids, mlist = [], [], [], [], []
    for i, ph in enumerate(record.phrases):
        if ph.segment_id is None:
            continue
        seg = seg_by_id[ph.segment_id]
        scores.append(float(seg.match_score))
        words.append(ph.text)
        labels.append(seg.coco_label)
        seg_ids.append(seg.id)
        mlist.append(margins.get(i))
    persons = [s for s in record.segments if s.coco_label == PERSON_LABEL]
    matched_person = [s for s in persons if s.matched]
    unmatched_person = [s for s in persons if not s.matched]
    unmatched_phrases = [ph for ph in record.phrases if ph.segment_id is None]
    defined_margins = [m for m in mlist if m is not None]
    min_margin = min(defined_margins) if defined_margins else None
    q = MatchQuality(
        n_phrases=len(record.phrases),
        n_segments=len(record.segments),
        n_person_segments=len(persons),
        n_matched=len(scores),
        n_matched_person=len(matched_person),
        n_unmatched_phrases=len(unmatched_phrases),
        n_unmatched_person_segments=len(unmatched_person),
        match_scores=scores,
        match_margins=mlist,
        matched_words=words,
        matched_labels=labels,
        matched_segment_ids=seg_ids,
        min_match_score=min(scores) if scores else None,
        mean_match_score=math.fsum(scores) / len(scores) if scores else None,
        min_margin=min_margin,
        unmatched_person_segment=bool(unmatched_person),
        unmatched_subject_phrase=any(names_a_person(ph.text) for ph in unmatched_phrases),
        ambiguous_match=min_margin is not None and min_margin < ambiguous_margin,
        no_person=not persons,
    )
    q.flags = [name for name in FLAG_NAMES if getattr(q, name)]
    return q
